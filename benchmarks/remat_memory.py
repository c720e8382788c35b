"""Memory and FLOPs of the train step under each remat policy, with and without
scan_layers: the step compiled for the local devices from abstract inputs
(``polyjax.memory``), nothing allocated, nothing run.

Temporaries are XLA's ``memory_analysis()`` per device; FLOPs are XLA's
``cost_analysis()`` per device (under scan_layers XLA counts the scanned layer
once, so compare FLOPs between policies within the Python loop only).

    python benchmarks/remat_memory.py --size tiny --batch 8 --seq 128
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/remat_memory.py \
        --size 1b --batch 64 --seq 4096 --mesh fsdp=8 --scan 1 --device_memory_gb 80
"""

from __future__ import annotations

import argparse
import time

import jax

from polyjax import memory
from polyjax.model import REMAT_POLICIES, preset


def parse_mesh(text: str) -> dict[str, int]:
    """ "fsdp=8,data=1" -> {"fsdp": 8, "data": 1}."""
    out = {}
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        out[axis] = int(size)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="dense", choices=("dense", "moe"))
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "1b"))
    p.add_argument("--act", default="polynorm")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=0, help="0: the preset's max_seq_len")
    p.add_argument("--mesh", default="data=-1", help="axis=size,... (default: data-parallel)")
    p.add_argument("--policies", default=",".join(REMAT_POLICIES))
    p.add_argument("--scan", default="0,1", help="scan_layers values: 0, 1 or 0,1")
    p.add_argument("--dtype", default="", help="override the preset's compute dtype")
    p.add_argument("--device_memory_gb", type=float, default=0.0)
    args = p.parse_args(argv)

    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    base = preset(args.family, args.size, args.act)
    if args.dtype:
        base["dtype"] = args.dtype
    seq = args.seq or base["max_seq_len"]
    mesh = parse_mesh(args.mesh)
    print(
        f"model: {args.family}/{args.size} {args.act} d_model={base['d_model']} "
        f"layers={base['n_layers']} dtype={base.get('dtype', 'float32')}; batch {args.batch} x "
        f"{seq}, mesh {mesh}; bytes and FLOPs per device"
    )
    print(
        f"{'scan':>4s} {'remat':20s} {'params+opt MB':>14s} {'temp MB':>11s} {'total MB':>11s} "
        f"{'temp/none':>9s} {'GFLOP':>10s} {'fits':>5s} {'compile s':>9s}"
    )
    capacity = args.device_memory_gb * 1e9 or None
    for scan in (s == "1" for s in args.scan.split(",")):
        baseline = None
        for policy in args.policies.split(","):
            model = {**base, "remat": policy, "scan_layers": scan}
            spec = memory.bench_spec(model, batch=args.batch, seq=seq, mesh=mesh)
            t0 = time.perf_counter()
            plan = memory.plan(spec, capacity)
            seconds = time.perf_counter() - t0
            baseline = plan.temp if policy == "none" else baseline
            ratio = f"{plan.temp / baseline:9.3f}" if baseline else f"{'':9s}"
            fits = {None: "?", True: "yes", False: "no"}[plan.fits]
            print(
                f"{int(scan):4d} {policy:20s} {(plan.params + plan.opt_state) / 1e6:14,.1f} "
                f"{plan.temp / 1e6:11,.1f} {plan.total / 1e6:11,.1f} {ratio} "
                f"{(plan.flops or 0) / 1e9:10.4g} {fits:>5s} {seconds:9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
