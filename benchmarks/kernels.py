"""Time PolyNorm forward and forward+backward: the XLA-compiled jnp reference
(autodiff), the jnp custom VJP (impl="xla") and the Pallas kernel (GPU/TPU only;
on CPU Pallas runs only in interpret mode, which says nothing about speed, so it
is skipped), plus LigerPolyNorm (PyTorch Triton) on a GPU when torch and
liger_kernel import. Reports achieved bandwidth against the device's peak and
ratios against the reference in the same run, and the bytes saved for the
backward (autodiff residuals and XLA's compiled temp memory).

    python benchmarks/kernels.py                  # tokens x {8256, 1536, 32768}, bf16
    python benchmarks/kernels.py --tokens 512     # fewer tokens (CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from polyjax import activations as acts
from polyjax import kernels

PEAK_BYTES_PER_S = {  # HBM bandwidth by device_kind substring
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "L4": 0.3e12,
    "TPU v6": 1.64e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12,
    "TPU v5p": 2.765e12,
    "TPU v5": 2.765e12,
    "TPU v4": 1.2e12,
}


def peak_for(kind: str) -> float | None:
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k in kind), None)


def timeit(fn, *args, iters: int) -> float:
    """Median seconds of ``fn(*args)`` after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(f):
    def run(x, w, b, g):
        y, vjp = jax.vjp(f, x, w, b)
        return y, vjp(g)

    return jax.jit(run)


def saved_bytes(f, x, w, b) -> int:
    """Bytes autodiff keeps for the backward (the vjp closure's arrays), traced only."""
    leaves = jax.eval_shape(lambda x: jax.tree.leaves(jax.vjp(f, x, w, b)[1]), x)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


def temp_bytes(f, x, w, b, g) -> int | None:
    analysis = fwd_bwd(f).lower(x, w, b, g).compile().memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes


def liger_times(tokens: int, width: int, iters: int) -> tuple[float, float] | None:
    """(forward, forward+backward) seconds of LigerPolyNorm, or None if unavailable."""
    try:
        import torch
        from liger_kernel.transformers import LigerPolyNorm
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    mod = LigerPolyNorm(eps=1e-6).cuda()
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def run(backward):
        for _ in range(2):
            y = mod(x)
            if backward:
                y.backward(g)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            y = mod(x)
            if backward:
                y.backward(g)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    return run(False), run(True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--widths", default="8256,1536,32768")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()

    dev = jax.devices()[0]
    platform = jax.default_backend()
    peak = peak_for(dev.device_kind)
    dtype = jnp.dtype(args.dtype)
    print(f"device: {dev.device_kind} ({platform}), jax {jax.__version__}, dtype {dtype.name}")
    print(f"peak HBM bandwidth: {peak / 1e12:.2f} TB/s" if peak else "peak bandwidth: unknown")
    if platform == "cpu":
        print("pallas: skipped on CPU (interpret mode only; meaningless for speed)")

    impls = {
        "reference": acts.polynorm,
        "custom_vjp": lambda x, w, b: kernels.polynorm(x, w, b, impl="xla"),
    }
    if platform != "cpu":
        impls["pallas"] = lambda x, w, b: kernels.polynorm(x, w, b, impl="pallas")

    w, b = acts.init_coeffs(args.order)
    header = f"{'shape':>14} {'impl':>11} {'pass':>8} {'time us':>10} {'GB/s':>8}"
    header += f" {'%peak':>6} {'vs ref':>7}"
    for width in [int(v) for v in args.widths.split(",")]:
        shape = (args.tokens, width)
        x = jax.random.normal(jax.random.key(0), shape, dtype)
        g = jax.random.normal(jax.random.key(1), shape, dtype)
        n_bytes = x.size * dtype.itemsize
        # minimum traffic: forward reads x and writes y; backward reads x, g, writes dx
        traffic = {"fwd": 2 * n_bytes, "fwd+bwd": 5 * n_bytes}
        times = {}
        for name, f in impls.items():
            times[name, "fwd"] = timeit(jax.jit(f), x, w, b, iters=args.iters)
            times[name, "fwd+bwd"] = timeit(fwd_bwd(f), x, w, b, g, iters=args.iters)
        liger = liger_times(*shape, args.iters) if platform == "gpu" else None
        if liger:
            times["liger", "fwd"], times["liger", "fwd+bwd"] = liger
        print(f"\n{header}")
        for (name, phase), t in times.items():
            bw = traffic[phase] / t
            pct = f"{100 * bw / peak:6.1f}" if peak else f"{'n/a':>6}"
            ratio = times["reference", phase] / t
            print(
                f"{'x'.join(map(str, shape)):>14} {name:>11} {phase:>8} {t * 1e6:10.1f}"
                f" {bw / 1e9:8.1f} {pct} {ratio:6.2f}x"
            )
        if platform == "gpu" and not liger:
            print("liger: skipped (torch / liger_kernel not importable or no CUDA)")
        print(f"saved for backward, {'x'.join(map(str, shape))} ({n_bytes / 2**20:.1f} MiB input):")
        for name in ("reference", "custom_vjp"):
            f = impls[name]
            tb = temp_bytes(f, x, w, b, g)
            tb_s = f"{tb / 2**20:.1f} MiB" if tb is not None else "n/a"
            print(
                f"  {name:>11}: autodiff residuals {saved_bytes(f, x, w, b) / 2**20:8.1f} MiB,"
                f" compiled fwd+bwd temp {tb_s}"
            )


if __name__ == "__main__":
    main()
