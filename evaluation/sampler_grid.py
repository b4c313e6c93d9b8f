"""One labelled image: every registered sampler at its default settings on one checkpoint.

    python -m evaluation.sampler_grid --checkpoint checkpoints/mnist-ddpm-cond --out docs/ddpm-samplers.png

Rows are samplers (with NFE and seconds), columns the same seeds; a class-conditional
checkpoint is asked for the digits 0–9 with guidance ``--guidance_scale``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
from pipelines import SamplerPipeline, make_grid
from schedulers.registry import SAMPLERS
from ui.service import labelled_grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num_images", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    args = p.parse_args(argv)
    pipe = SamplerPipeline.from_pretrained(args.checkpoint)
    kwargs = {}
    if pipe.family.is_conditional:
        kwargs = dict(class_labels=[i % pipe.family.num_classes for i in range(args.num_images)],
                      guidance_scale=args.guidance_scale)
    cells = []
    for name in args.samplers.split(","):
        out = pipe(name, None, batch_size=args.num_images, seed=args.seed, output_type="pt", **kwargs)
        label = f"{SAMPLERS[name].title} · NFE {out.nfe} · {out.seconds:.1f}s"
        cells.append((label, make_grid(out.images, nrow=args.num_images, padding=1)))
        print(label, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(cells, ncol=1).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
