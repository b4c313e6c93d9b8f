"""One sampling loop for every registered sampler and every checkpoint family.

    pipe = SamplerPipeline.from_pretrained("checkpoints/mnist-ddpm-cond")
    out = pipe("langevin", num_inference_steps=100, batch_size=16, seed=0, class_labels=3, guidance_scale=3)
    out.images  # 16 PIL images; out.nfe, out.seconds

The loop is diffusers' scheduler contract and nothing else:

    x = randn(shape, generator) · scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        ε = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(ε, t, x, generator=generator).prev_sample

where ``net`` is the checkpoint's network seen through
:class:`~schedulers.parametrization.EpsilonNetwork` (the one place that knows the model type).
Unlike diffusers' ``DDPMPipeline`` it honours ``scale_model_input`` and ``init_noise_sigma``, so
σ-space samplers are correct. Every call builds a fresh scheduler, so concurrent calls on one
pipeline cannot corrupt each other's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from data.images import make_grid, to_pil, to_uint8, to_unit_float  # noqa: F401  (make_grid, to_uint8: re-exported)
from schedulers.parametrization import EpsilonNetwork, ModelFamily
from schedulers.registry import LIMITS, create_scheduler, get_spec
from schedulers.schedules import DiscreteVPSchedule

from .checkpoint import CheckpointInfo, inspect_checkpoint, load_decoder, load_unet, ve_sampler_config
from .device import is_out_of_memory, out_of_memory_message, resolve_device, resolve_dtype


def estimate_bytes_per_image(unet, sample_shape: Sequence[int], guided: bool = False) -> int:
    """A rough upper estimate of the device memory one image of a batch takes while sampling (no gradients).

    For a ``UNet2DModel``: every skip connection kept for the up path (``layers_per_block + 1`` feature maps
    per level), a few working copies of the widest map, and the attention matrices (heads × tokens²), in
    the network's precision; plus the float32 sampler state (a few copies of the sample, for multistep
    solvers). Guided sampling evaluates the network on two copies of each image. Used to turn free device
    memory into a batch limit; unmeasured on a GPU, so it errs high (see README, Hardware).
    """
    cfg = getattr(unet, "config", None)
    try:
        param = next(unet.parameters())
        elem = param.element_size()
    except (AttributeError, StopIteration):
        elem = 4
    c, h, w = (list(sample_shape) + [1, 1, 1])[:3]
    state = 8 * c * h * w * 4  # x, x̂₀, ε̂, noise and a multistep history, float32
    channels = list(getattr(cfg, "block_out_channels", None) or [])
    if not channels:  # a transformer or an analytic network: activations of a few hundred channels per pixel
        width = int(getattr(cfg, "num_attention_heads", 8) or 8) * int(getattr(cfg, "attention_head_dim", 64) or 64)
        patch = int(getattr(cfg, "patch_size", 1) or 1)
        tokens = max(1, (h // patch) * (w // patch))
        layers = int(getattr(cfg, "num_layers", 12) or 12)
        activations = 12 * tokens * width + int(getattr(cfg, "num_attention_heads", 8) or 8) * tokens * tokens
        return int((activations * elem * max(1, layers // 4) * (2 if guided else 1)) + state)
    per_level = int(getattr(cfg, "layers_per_block", 2) or 2) + 1
    down = list(getattr(cfg, "down_block_types", None) or [])
    skips, widest, attention = 0, 0, 0
    for i, ch in enumerate(channels):
        side_h, side_w = max(1, h >> i), max(1, w >> i)
        pixels = side_h * side_w
        skips += per_level * ch * pixels
        widest = max(widest, 2 * ch * pixels)  # the up path concatenates a skip: twice the channels
        if i < len(down) and "Attn" in down[i]:
            head_dim = getattr(cfg, "attention_head_dim", None) or ch
            attention = max(attention, max(1, ch // head_dim) * pixels * pixels)
    activations = skips + 6 * widest  # the skips, a resnet's working tensors and the concatenation
    per_image = activations * elem + attention * 4  # softmax is upcast to float32
    return int(per_image * (2 if guided else 1) + state)


class SamplingDivergedError(RuntimeError):
    """The sample became non-finite; the message says at which step and what to lower."""


class SamplingOutOfMemoryError(ValueError):
    """The batch did not fit on the device; the message says which batch size would."""


class SamplingCancelled(RuntimeError):
    """``should_stop`` asked the loop to stop."""


@dataclass
class SampleOutput:
    """Result of a sampling run.

    Attributes:
        images: PIL images, a float array ``[B, H, W, C]`` in [0, 1] (``"np"``), or the raw final
            tensor ``[B, C, H, W]`` in model units (``"pt"``).
        nfe: network evaluations (a classifier-free-guided evaluation counts once).
        seconds: wall time of the loop.
        sampler, num_inference_steps, params: what was run.
    """

    images: Union[list, np.ndarray, torch.Tensor]
    nfe: int
    seconds: float
    sampler: str
    num_inference_steps: int
    params: dict = field(default_factory=dict)
    decoder_calls: int = 0  # decodes of latents into images (latent checkpoints), counted apart from NFE


class SamplerPipeline:
    """Sample any checkpoint with any registered sampler.

    Args:
        unet: the network (``UNet2DModel`` or anything with its call signature).
        family: how the network was trained.
        sampler_config: the DDPM schedule every sampler is configured from (for a VE network,
            the schedule that spans its σ range; see ``checkpoint.family_from_configs``).
        info: the checkpoint description, when loaded from a folder.
        sample_shape: the shape of one sample the network takes (latents for a latent checkpoint);
            default: from the network's config.
        decoder: a :class:`~pipelines.latent.LatentDecoder` for a latent checkpoint; the samplers then
            run on latents and ``images`` are decoded.
    """

    def __init__(self, unet, family: ModelFamily, sampler_config: Optional[dict] = None, info: Optional[CheckpointInfo] = None,
                 sample_shape: Optional[Sequence[int]] = None, decoder=None):
        self.unet = unet
        self.family = family
        self.info = info
        self.decoder = decoder
        if family.latent and decoder is None:
            raise ValueError("a latent network needs its decoder (pipelines.latent.LatentDecoder) to make images")
        if family.kind == "ve" and not sampler_config:
            sampler_config = ve_sampler_config(family)
        self.sampler_config = dict(sampler_config or {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                                      "beta_schedule": "linear"})
        self.sampler_config["clip_denoised"] = family.clip_denoised  # the registry keeps x̂₀ clipping off for latents
        self.schedule = DiscreteVPSchedule.from_config(self.sampler_config)
        if sample_shape is None:
            cfg = getattr(unet, "config", None)
            size = getattr(cfg, "sample_size", 32)
            size = size[0] if isinstance(size, (list, tuple)) else size
            sample_shape = (getattr(cfg, "in_channels", 1), size, size)
        self.sample_shape = tuple(sample_shape)

    @classmethod
    def from_pretrained(cls, source: str, device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype] = torch.float32,
                        allow_hub: bool = True, allowed_roots: Optional[list] = None,
                        torch_dtype: Union[str, torch.dtype, None] = None) -> "SamplerPipeline":
        """Load a diffusers-format checkpoint folder or Hub repo id (see :mod:`pipelines.checkpoint`).

        Args:
            device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"`` or a torch device.
            dtype, torch_dtype: the network's precision (``torch_dtype`` as in diffusers); the sampler
                state and every scheduler formula stay in float32.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(torch_dtype if torch_dtype is not None else dtype, device)
        info = inspect_checkpoint(source, allow_hub=allow_hub, allowed_roots=allowed_roots)
        unet = load_unet(info, device=device, dtype=dtype)
        decoder = load_decoder(info, device=device, dtype=dtype)
        return cls(unet, info.family, info.sampler_config, info=info,
                   sample_shape=(info.in_channels, info.sample_size, info.sample_size), decoder=decoder)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (or x̂₀ estimates) → images in [-1, 1]: decoded for a latent checkpoint, as they are otherwise."""
        return x if self.decoder is None else self.decoder.decode(x)

    @property
    def network_dtype(self) -> torch.dtype:
        """The network's precision (the sampler state is always float32)."""
        for tensor in self.unet.parameters() if hasattr(self.unet, "parameters") else ():
            return tensor.dtype
        return torch.float32

    def bytes_per_image(self, guided: bool = False) -> int:
        """Estimated device memory per image while sampling (see :func:`estimate_bytes_per_image`)."""
        return estimate_bytes_per_image(self.unet, self.sample_shape, guided)

    @property
    def device(self) -> torch.device:
        for tensor in list(self.unet.parameters()) + list(self.unet.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _class_labels(self, class_labels, batch_size: int, guidance_scale: float) -> Optional[torch.Tensor]:
        f = self.family
        w_max = LIMITS.max_guidance
        if not (isinstance(guidance_scale, (int, float)) and np.isfinite(guidance_scale) and 0 <= guidance_scale <= w_max):
            raise ValueError(f"guidance_scale must be a number between 0 and {w_max:g}, got {guidance_scale!r}")
        if class_labels is None:
            if f.is_conditional and f.null_class_label is None:
                raise ValueError("class_labels: this checkpoint is class-conditional without a null label; "
                                 f"give class labels in 0..{f.num_classes - 1}")
            if guidance_scale != 1.0 and f.is_conditional:
                raise ValueError("guidance_scale ≠ 1 needs class_labels (guidance pushes towards a class)")
            return None
        if not f.is_conditional:
            raise ValueError("class_labels: this checkpoint is unconditional; class labels do not apply")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"class_labels: got {labels.numel()} labels for a batch of {batch_size}")
        if (labels < 0).any() or (labels >= f.num_classes).any():
            raise ValueError(f"class_labels must be in 0..{f.num_classes - 1}, got {labels.tolist()}")
        if guidance_scale != 1.0 and f.null_class_label is None:
            raise ValueError("guidance_scale ≠ 1 needs a checkpoint trained with label dropout (no null label here)")
        return labels.to(self.device)

    def prepare(self, scheduler: str, num_inference_steps: Optional[int], scheduler_params: Optional[dict]):
        """Build and set a fresh scheduler; validates the step count and parameters."""
        spec = get_spec(scheduler)
        steps = spec.default_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, np.integer):
            steps = int(steps)
        sched, step_kwargs = create_scheduler(scheduler, self.sampler_config, scheduler_params)  # validates the parameters
        steps = spec.check_steps(steps, self.sampler_config, scheduler_params)
        sched.set_timesteps(steps, device=self.device)
        return sched, step_kwargs, steps

    @torch.no_grad()
    def __call__(
        self,
        scheduler: str = "ddim",
        num_inference_steps: Optional[int] = None,
        scheduler_params: Optional[dict] = None,
        batch_size: int = 1,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        class_labels=None,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
        callback_steps: int = 1,
        should_stop: Optional[Callable[[], bool]] = None,
        dtype: torch.dtype = torch.float32,
    ) -> SampleOutput:
        """Draw ``batch_size`` samples.

        Args:
            scheduler: registry name (``schedulers.registry.SAMPLERS``).
            num_inference_steps: the sampler's step count (noise levels for Langevin); default: the registry's.
            scheduler_params: values for the sampler's parameters (e.g. ``{"eta": 1.0}``).
            batch_size: number of images.
            seed: seeds a CPU ``torch.Generator``, so a seed gives the same images on any device.
            generator: used instead of ``seed`` when given.
            class_labels: an int or one per image, for class-conditional checkpoints.
            guidance_scale: classifier-free guidance weight w (docs/guidance.md); 1 = plain conditional.
            output_type: ``"pil"``, ``"np"`` (float [0, 1], NHWC), ``"pt"`` (image tensor in [-1, 1], not
                clamped for pixel models) or ``"latent"`` (the final sample itself; the same as ``"pt"`` for
                pixel-space checkpoints).
            callback: called as ``callback(i, n, x_t, x0_hat)`` every ``callback_steps`` steps and at the end.
            callback_steps: how often ``callback`` is called.
            should_stop: polled before every step; returning True raises :class:`SamplingCancelled`.
            dtype: dtype of the loop state (the network keeps its own).

        Raises:
            ValueError: bad arguments (the message names the parameter).
            SamplingDivergedError: the sample became non-finite.
        """
        spec = get_spec(scheduler)
        max_batch = LIMITS.max_batch
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= max_batch:
            raise ValueError(f"batch_size must be a whole number between 1 and {max_batch}, got {batch_size!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not isinstance(callback_steps, int) or callback_steps < 1:
            raise ValueError(f"callback_steps must be a positive whole number, got {callback_steps!r}")
        labels = self._class_labels(class_labels, int(batch_size), float(guidance_scale))
        sched, step_kwargs, steps = self.prepare(scheduler, num_inference_steps, scheduler_params)
        net = EpsilonNetwork(self.unet, self.family, self.schedule)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**63))

        start = time.perf_counter()
        device = self.device
        x = torch.randn((int(batch_size), *self.sample_shape), generator=generator, dtype=dtype).to(device)
        x = x * sched.init_noise_sigma
        timesteps = sched.timesteps
        n = len(timesteps)
        try:
            for i, t in enumerate(timesteps):
                if should_stop is not None and should_stop():
                    raise SamplingCancelled(f"stopped at step {i} of {n}")
                model_input = sched.scale_model_input(x, t)
                epsilon_hat = net(model_input, t, class_labels=labels, guidance_scale=guidance_scale)
                out = sched.step(epsilon_hat, t, x, generator=generator, **step_kwargs)
                x_prev = out.prev_sample
                if not torch.isfinite(x_prev).all():
                    raise SamplingDivergedError(
                        f"{spec.title}: the sample became non-finite at step {i + 1} of {n} "
                        f"(timestep {float(t):.4g}); {spec.divergence_hint}")
                if callback is not None and ((i + 1) % callback_steps == 0 or i == n - 1):
                    x0_hat = getattr(out, "pred_original_sample", None)
                    if x0_hat is None:  # diffusers' multistep solvers: Tweedie from ε in the VP state
                        x0_hat = net.x0_hat(epsilon_hat, x, t)
                    callback(i, n, x_prev, x0_hat)
                x = x_prev
            if output_type != "latent":
                x = self.to_images(x)  # a decoder can run out of memory too
        except Exception as err:
            if is_out_of_memory(err):
                guided = labels is not None and guidance_scale != 1.0
                raise SamplingOutOfMemoryError(
                    out_of_memory_message(int(batch_size), device, self.bytes_per_image(guided))) from err
            raise
        seconds = time.perf_counter() - start
        if output_type in ("pt", "latent"):
            images = x
        elif output_type == "np":
            images = to_unit_float(x)
        else:
            images = to_pil(x)
        params = {**spec.defaults(), **(scheduler_params or {})}
        return SampleOutput(images=images, nfe=net.nfe, seconds=seconds, sampler=scheduler, num_inference_steps=steps,
                            params=params, decoder_calls=int(self.decoder is not None and output_type != "latent"))
