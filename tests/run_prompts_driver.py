"""A prompt-file run of a tiny random pipeline, for tests/test_runs.py to start in a subprocess:
alone, or under torchrun (`python -m torch.distributed.run --nproc_per_node 2 ...`) on the CPU.

    python tests/run_prompts_driver.py PROMPTS OUTPUT_DIR [--model lumina-next] [--seeds 0,1] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: the project's root

from accelaes import AccelAes, AccelAesConfig  # noqa: E402
from pipelines import REGISTRY  # noqa: E402
from runs import data_parallel, make_jobs, read_prompts, run_jobs, seed_list  # noqa: E402

SIZE, STEPS = 64, 6
# AccelAes with every part on, its mask built early enough for 6 steps.
ACCELAES = dict(sparse=True, spatial_cfg=True, mask_step=2, warmup=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--model", default="lumina-next", choices=sorted(REGISTRY))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--encode-first", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    backbone = REGISTRY[args.model]
    config = AccelAesConfig(**{**backbone.accelaes, **ACCELAES})
    jobs = make_jobs(read_prompts(args.prompts), seed_list([int(s) for s in args.seeds.split(",")]))
    with data_parallel("cpu") as process:
        pipeline = backbone.pipeline.random(seed=0)     # on the CPU, where process.device is here
        summary = run_jobs(pipeline, jobs, args.output_dir, settings=pipeline.Settings(steps=args.steps),
                           height=SIZE, width=SIZE, batch_size=args.batch_size,
                           accelerator=None if args.dense else lambda: AccelAes.create(config),
                           encode_first=args.encode_first, overwrite=args.overwrite,
                           parameters={"model": f"random {args.model}"}, process=process)
    print(f"rank {process.rank}: {summary.describe()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
