"""What a run of each scaling-ladder rung costs here: its shape, parameters, tokens
and training FLOPs (``flops_per_token`` x tokens), the measured seconds of a train
step and of one evaluation over the rung's held-out batches, and the minutes a run
takes from them (compile + steps + evaluations). The CPU seconds of a step (all the
process's threads) hardly depend on what else the machine runs: on a loaded machine
they, divided by the cores a step keeps busy alone, estimate the unloaded wall time.

One step = the trainer's own update step (``polyjax.train.make_steps``), jitted, on
random tokens of the rung's batch shape; one evaluation = ``train.eval_batches``
calls of its eval step. Medians over ``--steps`` calls after ``--warmup``.

    python benchmarks/ladder_cost.py --sizes ladder0,ladder1,ladder2,ladder3 --steps 30
    python benchmarks/ladder_cost.py --sizes ladder3 --acts swiglu,polyrelu,polynorm
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

from benchmarks.step_time import random_batch
from polyjax import sharding as shd
from polyjax import train
from polyjax.config import Spec
from polyjax.model import flops_per_token, param_counts


def measure(spec: Spec, steps: int, warmup: int) -> dict:
    """Seconds: the first step (compile), the median step, one evaluation pass."""
    model = shd.create_model(spec.model, spec.mesh, spec.rules, seed=0)
    jitted = train.make_steps(spec, model)
    state = jitted.init(*nnx.split(model, nnx.Param, ...)[1:])
    del model
    batch = random_batch(spec, jitted.batch_sharding)
    times, cpu = [], []
    for _ in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = jitted.train(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    eval_batch = {**batch}
    jax.block_until_ready(jitted.eval(state.params, state.rest, eval_batch))  # compile
    evals = []
    for _ in range(max(steps // 5, 3)):
        start = time.perf_counter()
        jax.block_until_ready(jitted.eval(state.params, state.rest, eval_batch))
        evals.append(time.perf_counter() - start)
    return {
        "first_s": times[0],
        "step_s": statistics.median(times[warmup:]),
        "cpu_s": statistics.median(cpu[warmup:]),
        "eval_s": statistics.median(evals) * spec.train.eval_batches,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="ladder0,ladder1,ladder2,ladder3")
    p.add_argument("--acts", default="swiglu,polynorm", help="the minutes are of the slowest")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    from configs import dense  # the sizes (ml_collections): only when run

    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    head = (
        f"{'size':8s} {'d':>4s} {'L':>3s} {'ffn':>9s} {'params':>11s} {'non-emb':>10s} "
        f"{'steps':>6s} {'tokens':>8s} {'FLOPs':>9s} {'act':>9s} {'s/step':>7s} "
        f"{'cpu s':>6s} {'eval s':>7s} {'evals':>5s} {'min/run':>7s}"
    )
    print(head)
    for size in args.sizes.split(","):
        for act in args.acts.split(","):
            spec = Spec.from_config(dense.get_config(f"act={act},size={size}"))
            m, t, d = spec.model, spec.train, spec.data
            counts = param_counts(m)
            tokens = t.steps * d.global_batch * d.seq_len
            flops = flops_per_token(m, d.seq_len) * tokens
            r = measure(spec, args.steps, args.warmup)
            n_evals = t.steps // t.eval_every + (t.steps % t.eval_every != 0)
            minutes = (r["first_s"] + t.steps * r["step_s"] + n_evals * r["eval_s"]) / 60
            print(
                f"{size:8s} {m.d_model:4d} {m.n_layers:3d} {m.d_ff:9d} {counts['total']:11,d} "
                f"{counts['total'] - counts['embedding']:10,d} {t.steps:6d} "
                f"{tokens / 1e6:7.2f}M {flops:9.3g} {act:>9s} {r['step_s']:7.3f} {r['cpu_s']:6.3f} "
                f"{r['eval_s']:7.1f} {n_evals:5d} {minutes:7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
