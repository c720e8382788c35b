"""Run a study of the paper by name and write its table and plots.

    python launch.py --experiment NAME [--workdir DIR] [--config.train.steps=600]
    python -m experiments.run NAME [--scale cpu|toy|paper] [--seeds 0,1,2] [--out DIR]

NAME: order, composition, relu_variants, activations, moe (training studies),
analysis (effective rank and layer similarity of the activations study's
checkpoints) or theory (Lemma 1 and approximation rates; no LLM training).
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

from experiments.studies import STUDIES
from experiments.study import SCALES

NAMES = (*STUDIES, "analysis", "theory")


def main(argv: Sequence[str] | None = None, extra: Sequence[tuple[str, str]] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("--scale", default="cpu", choices=SCALES, help="cpu: 2 CPU cores")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", help="default: runs/experiments/<name>")
    args = parser.parse_args(argv)
    out = args.out or f"runs/experiments/{args.name}"
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.name == "theory":
        from experiments import theory

        theory.main(["--out", out, "--seeds", str(max(len(seeds), 2))])
    elif args.name == "analysis":
        from experiments import analysis

        analysis.main(out, scale=args.scale, seeds=seeds, extra=extra)
    else:
        from experiments import study

        study.run(STUDIES[args.name], out, scale=args.scale, seeds=seeds, extra=extra)
        print((pathlib.Path(out) / "table.md").read_text())
        print(f"wrote {out}/table.md, table.csv, curves.png")


if __name__ == "__main__":
    main()
