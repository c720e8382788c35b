"""The paper's models compiled for TPU and GPU targets by their own compilers, on any
machine (polyjax.aot): a Markdown table of what each compiled step needs and what the
compiler estimates, one row per (model, target), each with the command that gives
the same figures. Everything but the memory is an estimate, not a measurement.

    python -m benchmarks.aot_table --targets v5p-8,v5p-64,h100x8 --out docs/aot_table.md
    python -m benchmarks.aot_table --rows dense-polynorm --targets v5p-16   # one row

Needs the aot extra (libtpu, the CUDA plugin). A 1b row takes a few minutes of
compiling on 2 CPU cores (the step, then one and two layers for the figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

from polyjax import aot

ROWS = {  # label -> (config file argument, overrides)
    "dense-swiglu": ("configs/dense.py:act=swiglu,size=1b", {}),
    "dense-polynorm": ("configs/dense.py:act=polynorm,size=1b", {}),
    "dense-polynorm-pallas": (
        "configs/dense.py:act=polynorm,size=1b",
        {"model.activation.kernel": "pallas"},
    ),
    "dense-polynorm-xla-attention": (
        "configs/dense.py:act=polynorm,size=1b",
        {"model.attention": "xla"},
    ),
    "dense-swiglu-xla-attention": (
        "configs/dense.py:act=swiglu,size=1b",
        {"model.attention": "xla"},
    ),
    "moe-polynorm": ("configs/moe.py:act=polynorm,size=1b", {}),
    "moe-swiglu": ("configs/moe.py:act=swiglu,size=1b", {}),
    "moe-polynorm-capacity": (  # XLA:GPU lowers ragged_dot to a dense product per expert
        "configs/moe.py:act=polynorm,size=1b",
        {"model.moe.dispatch": "capacity"},
    ),
    "moe-polynorm-expert4": (  # for 4 devices (v5p-8), where expert=8 does not divide
        "configs/moe.py:act=polynorm,size=1b",
        {"mesh.expert": 4},
    ),
}


@dataclasses.dataclass
class Row:
    label: str
    target: str
    command: str
    temp: float | None = None
    total: float | None = None
    fits: str = ""
    flops: float | None = None
    bytes: float | None = None
    seconds: float | None = None
    source: str = ""
    mfu: float | None = None
    tokens_per_s: float | None = None
    collectives: str = ""
    wall: float = 0.0


def config_of(arg: str, overrides: dict):
    """The ml_collections config of ``configs/<file>.py:<arg>`` with ``overrides``."""
    import importlib

    path, _, config_arg = arg.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    cfg = module.get_config(config_arg)
    cfg.update_from_flattened_dict(overrides)
    return cfg


def measure(label: str, target_name: str) -> Row:
    from polyjax.config import Spec

    arg, overrides = ROWS[label]
    flags = "".join(f" --config.{k}={v}" for k, v in overrides.items())
    command = f"python launch.py --config {arg}{flags} --dry_run --target {target_name}"
    row, t0 = Row(label, target_name, command), time.perf_counter()
    target = aot.get_target(target_name)
    spec = Spec.from_config(config_of(arg, overrides), target.devices)
    try:
        report = aot.compile_report(spec, target)
    except aot.DoesNotFitError as e:
        row.fits, row.wall = f"no: {str(e).split(': ', 1)[1]}", time.perf_counter() - t0
        return row
    f, (seconds, source) = report.figures, report.seconds
    row.temp, row.total = report.plan.temp, report.plan.total
    row.fits = "yes" if report.plan.fits else f"no: {report.verdict.split(': ', 1)[1]}"
    row.flops, row.bytes, row.seconds, row.source = f.flops, f.bytes, seconds, source
    row.mfu, row.tokens_per_s = report.mfu, report.tokens_per_step / seconds
    moved = [(op.replace("collective-", ""), b) for op, (n, b) in f.collectives.items() if n]
    row.collectives = ", ".join(f"{op} {b / 1e9:.3g}" for op, b in moved)
    row.wall = time.perf_counter() - t0
    return row


def markdown(rows: list[Row]) -> str:
    g = lambda x, scale, fmt: "-" if x is None else format(x / scale, fmt)
    head = (
        "| model | target | temporaries / device (GB) | total / device (GB) | fits | "
        "FLOPs / device (T) | bytes accessed / device (TB) | est. step time (s) | est. MFU | "
        "est. tokens/s | collectives / device (GB) |"
    )
    out = [head, "|---" * 11 + "|"]
    for r in rows:
        time_cell = g(r.seconds, 1, ".3f") + (" (roofline)" if "roofline" in r.source else "")
        out.append(
            f"| {r.label} | {r.target} | {g(r.temp, 1e9, '.1f')} | {g(r.total, 1e9, '.1f')} | "
            f"{r.fits} | {g(r.flops, 1e12, '.1f')} | {g(r.bytes, 1e12, '.3f')} | {time_cell} | "
            f"{g(r.mfu, 0.01, '.1f')}{'%' if r.mfu else ''} | {g(r.tokens_per_s, 1, ',.0f')} | "
            f"{r.collectives or '-'} |"
        )
    out += ["", "Commands (each row's figures, with the full report):", ""]
    out += [f"- {r.label} on {r.target}: `{r.command}`" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--targets", default="v5p-8,v5p-64,h100x8")
    parser.add_argument("--out", default="", help="write the Markdown table here")
    args = parser.parse_args(argv)
    aot.prepare()
    rows = []
    for label in args.rows.split(","):
        for target in args.targets.split(","):
            rows.append(measure(label, target))
            r = rows[-1]
            print(f"{label} on {target}: {r.fits}, {r.seconds} s, MFU {r.mfu} ({r.wall:.0f} s)")
            sys.stdout.flush()
            if args.out:  # written as it goes: a long table survives an interruption
                pathlib.Path(args.out).write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
