"""Time PolyNorm forward and forward+backward per kernel choice, against the copy
bandwidth of the same device measured in the same run.

Kernels: "reference" (the jnp function, differentiated by JAX), "xla" (the
fused custom VJP in jnp), "pallas" (the Triton kernels on GPU) and "mosaic_gpu"
(the Mosaic GPU kernels, Hopper, at the widths they take; Triton elsewhere). On
CPU the Pallas ones run in interpret mode, which checks that they run and says
nothing about speed. Before timing, each kernel's output and
input gradient are checked against the fp32 reference; a kernel that disagrees
is reported and not timed, and the script exits with status 1.

Timing: ``--iters`` applications inside one jitted ``lax.fori_loop`` whose carry
is the previous output (so nothing is hoisted or skipped and dispatch is paid
once); the time per application is (T(2n) - T(n)) / n, each T the shortest of
``--repeats`` runs, which cancels the fixed costs. The copy bandwidth is timed
the same way (a loop of y = -x). Traffic counted: forward reads x and writes y
(2 N bytes), forward+backward also reads x and g and writes dx (5 N in all).

    python benchmarks/kernels.py                      # 16384 x {1536,5504,8256,32768} bf16
    python benchmarks/kernels.py --tokens 256 --widths 1536,8256 --iters 4   # CPU
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from polyjax import activations as acts
from polyjax import kernels

KERNELS = {
    "reference": acts.polynorm,
    "xla": lambda x, w, b: kernels.polynorm(x, w, b, impl="xla"),
    "pallas": lambda x, w, b: kernels.polynorm(x, w, b, impl="pallas"),
    "mosaic_gpu": lambda x, w, b: kernels.polynorm(x, w, b, impl="pallas", backend="mosaic_gpu"),
}


def fwd_bwd(f):
    """(x, g) -> (dx, y): the forward and the input gradient for cotangent g."""

    def run(x, g, w, b):
        y, vjp = jax.vjp(lambda x: f(x, w, b), x)
        return vjp(g)[0], y

    return run


def loop(step, n: int):
    """A jitted function applying ``step`` to its carry n times."""

    def body(_, carry):
        return jax.lax.optimization_barrier(step(*carry))

    return jax.jit(lambda *carry: jax.lax.fori_loop(0, n, body, carry))


def seconds_per_step(step, carry, n: int, repeats: int) -> float:
    """(T(2n) - T(n)) / n with T the shortest wall time of a loop of that length
    over ``repeats`` runs; T(2n) / 2n where noise makes the difference negative
    (a loaded CPU), which then includes the fixed costs."""

    def best_time(n):
        run = loop(step, n)
        jax.block_until_ready(run(*carry))  # compile and warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(*carry))
            times.append(time.perf_counter() - t0)
        return min(times)

    t1, t2 = best_time(n), best_time(2 * n)
    return (t2 - t1) / n if t2 > t1 else t2 / (2 * n)


def max_rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--widths", default="1536,5504,8256,32768")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--kernels", default="", help="default: all; on CPU reference,xla,pallas")
    p.add_argument("--iters", type=int, default=50, help="loop length n (the loop runs n and 2n)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    dev, platform = jax.devices()[0], jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    names = args.kernels.split(",") if args.kernels else list(KERNELS)
    if platform == "cpu" and not args.kernels:
        names.remove("mosaic_gpu")
    print(f"device: {dev.device_kind} ({platform}), jax {jax.__version__}, dtype {dtype.name}")
    if platform == "cpu" and {"pallas", "mosaic_gpu"} & set(names):
        print("pallas, mosaic_gpu: interpret mode on CPU; the times say nothing about speed")
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    w, b = acts.init_coeffs(args.order)
    w = w * jnp.arange(1.0, args.order + 1)  # distinct coefficients
    failed = False
    header = (
        f"{'shape':>12} {'kernel':>10} {'pass':>8} {'us':>10} {'GB/s':>8} {'of copy':>8} "
        f"{'vs xla':>7} {'max err':>8}"
    )
    for width in [int(v) for v in args.widths.split(",")]:
        shape = (args.tokens, width)
        x = jax.random.normal(jax.random.key(0), shape, dtype)
        g = jax.random.normal(jax.random.key(1), shape, dtype)
        n_bytes = x.size * dtype.itemsize
        copy_s = seconds_per_step(lambda x: (-x,), (x,), args.iters, args.repeats)
        copy_bw = 2 * n_bytes / copy_s
        print(f"\n{shape[0]} x {width}: copy {copy_s * 1e6:.1f} us, {copy_bw / 1e9:.1f} GB/s")
        print(header)
        f32 = jnp.float32
        want_dx, want_y = jax.jit(fwd_bwd(acts.polynorm))(x.astype(f32), g.astype(f32), w, b)
        rows = {}
        if "mosaic_gpu" in names and not kernels.mosaic_gpu.supports(width, dtype, 2):
            print(f"mosaic_gpu: not for width {width} in {dtype.name}: its times are Triton's")
        for name in names:
            f = KERNELS[name]
            dx, y = jax.jit(fwd_bwd(f))(x, g, w, b)
            err = max(max_rel_err(y, want_y), max_rel_err(dx, want_dx))
            if not err <= tol:
                print(f"{'x'.join(map(str, shape)):>12} {name:>10} MISMATCH: max error {err:.2e}")
                failed = True
                continue
            fwd = seconds_per_step(lambda x, f=f: (f(x, w, b),), (x,), args.iters, args.repeats)
            both = seconds_per_step(
                lambda x, g, f=f: fwd_bwd(f)(x, g, w, b), (x, g), args.iters, args.repeats
            )
            rows[name] = {"fwd": fwd, "fwd+bwd": both, "err": err}
        for name, r in rows.items():
            for phase, traffic in (("fwd", 2 * n_bytes), ("fwd+bwd", 5 * n_bytes)):
                t, bw = r[phase], traffic / r[phase]
                vs = f"{rows['xla'][phase] / t:6.2f}x" if "xla" in rows else f"{'n/a':>7}"
                print(
                    f"{'x'.join(map(str, shape)):>12} {name:>10} {phase:>8} {t * 1e6:10.1f} "
                    f"{bw / 1e9:8.1f} {bw / copy_bw:8.2f} {vs} {r['err']:8.1e}"
                )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
