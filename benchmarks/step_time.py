"""Train-step time, tokens/s and MFU of a preset, and PolyNorm vs SwiGLU in one process.

One step = the trainer's own update step (``polyjax.train.make_steps``: forward,
backward, clipping, AdamW, the non-finite guard), jitted, the state donated, on a
data-parallel mesh of all local devices, on random tokens. Model FLOPs per token
follow PaLM (appendix B): 6 N + 12 n_layers d_model seq, N the active
non-embedding parameters (the head included), no discount for the causal mask and
none for recomputation (remat). MFU is against the bf16 dense peak of the device
kind (n/a on CPU or an unknown device).

``--batch auto`` takes the largest global batch (a multiple of the device count,
doubling) whose step the memory plan (``polyjax.memory``) says fits the device,
for every activation compared; the device's memory comes from the runtime or
``--device_memory_gb``.

    python benchmarks/step_time.py --family dense --size tiny --act polynorm --baseline swiglu
    python benchmarks/step_time.py --size 1b --act polynorm --baseline swiglu --batch auto
    python benchmarks/step_time.py --size 1b --act polynorm --baseline '' --kernel pallas
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from polyjax import memory, train
from polyjax import sharding as shd
from polyjax.config import Spec
from polyjax.metrics import peak_flops
from polyjax.model import flops_per_token, param_counts, preset


def random_batch(spec: Spec, sharding, seed: int = 0) -> dict:
    """A global batch of random tokens, one document per row, every token weighted."""
    b, seq = spec.data.global_batch, spec.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, spec.model.vocab_size, (b, seq + 1), dtype=np.int32)
    host = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)),
        "segment_ids": np.ones((b, seq), np.int32),
        "weights": np.ones((b, seq), np.float32),
    }
    return {k: jax.device_put(v, sharding) for k, v in host.items()}


def measure(spec: Spec, steps: int, warmup: int) -> dict:
    """Median wall time (s) of the train step on one batch, after ``warmup`` steps."""
    model = shd.create_model(spec.model, spec.mesh, spec.rules, seed=0)
    jitted = train.make_steps(spec, model)
    state = jitted.init(*nnx.split(model, nnx.Param, ...)[1:])
    del model
    batch = random_batch(spec, jitted.batch_sharding)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = jitted.train(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "loss": loss}


def model_config(args, act: str) -> dict:
    d = preset(args.family, args.size, act)
    d.update({k: v for k, v in (("dtype", args.dtype), ("remat", args.remat)) if v})
    if args.kernel:
        d["activation"] = {**d["activation"], "kernel": args.kernel}
    return d


def auto_batch(models: dict[str, dict], seq: int, capacity: float, max_batch: int) -> int:
    """The largest global batch (device count x 1, 2, 4, ...) that fits every model."""
    n = jax.device_count()
    candidates = [n << i for i in range(max(max_batch // n, 1).bit_length())]
    best = candidates[-1]
    for act, d in models.items():
        spec_for = lambda b, d=d: memory.bench_spec(d, batch=b, seq=seq)
        batch, plan = memory.largest_batch(spec_for, capacity, candidates)
        if batch is None:
            raise SystemExit(f"{act}: even a batch of {n} does not fit {capacity / 1e9:.3f} GB")
        print(f"memory plan, {act}: batch {batch} fits:\n{plan.describe()}")
        best = min(best, batch)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="dense", choices=("dense", "moe"))
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "1b"))
    p.add_argument("--act", default="polynorm")
    p.add_argument("--baseline", default="swiglu", help="'' to skip the comparison")
    p.add_argument("--batch", default="8", help="global batch (sequences), or 'auto'")
    p.add_argument("--max_batch", type=int, default=1024, help="with --batch auto")
    p.add_argument(
        "--device_memory_gb", type=float, default=0.0, help="with --batch auto: 0 = the runtime's"
    )
    p.add_argument("--seq", type=int, default=0, help="0: the preset's max_seq_len")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="", help="override the preset's compute dtype")
    p.add_argument("--remat", default="", help="override the preset's remat policy")
    p.add_argument(
        "--kernel",
        default="",
        choices=("", "xla", "pallas", "reference"),
        help="activation.kernel of the PolyNorm/PolyReLU family (default: the preset's)",
    )
    args = p.parse_args(argv)

    devices = jax.devices()
    kind = devices[0].device_kind
    peak = peak_flops(kind)
    acts = [args.act] + ([args.baseline] if args.baseline else [])
    print(f"device: {len(devices)} x {kind} ({jax.default_backend()}), jax {jax.__version__}")
    models = {act: model_config(args, act) for act in acts}
    seq = args.seq or models[args.act]["max_seq_len"]
    if args.batch == "auto":
        capacity, source = memory.device_memory(devices[0], args.device_memory_gb * 1e9)
        if capacity is None:
            raise SystemExit(f"--batch auto: a {kind}'s memory is unknown; give --device_memory_gb")
        print(f"device memory {capacity / 1e9:.3f} GB ({source})")
        batch = auto_batch(models, seq, capacity, args.max_batch)
    else:
        batch = int(args.batch)
    rows = {}
    for act, d in models.items():
        spec = memory.bench_spec(d, batch=batch, seq=seq)
        r = measure(spec, args.steps, args.warmup)
        tokens = batch * seq
        r["params"] = param_counts(spec.model)["total"]
        r["tok_s"] = tokens / r["step_s"]
        r["tflops"] = flops_per_token(spec.model, seq) * tokens / r["step_s"] / 1e12 / len(devices)
        r["mfu"] = f"{100 * r['tflops'] * 1e12 / peak:.1f}%" if peak else "n/a"
        r["cfg"] = spec.model
        rows[act] = r
    cfg = rows[args.act]["cfg"]
    print(
        f"config: {args.family}/{args.size} d_model={cfg.d_model} layers={cfg.n_layers} "
        f"dtype={cfg.dtype} remat={cfg.remat} scan={cfg.scan_layers} "
        f"kernel={cfg.activation.kernel} batch={batch} seq={seq} steps={args.steps} (median), "
        "the trainer's step (fwd+bwd+clip+AdamW)"
    )
    print(f"{'act':10s} {'params':>14s} {'step ms':>9s} {'tokens/s':>11s} {'TFLOP/s/dev':>12s} MFU")
    for act, r in rows.items():
        print(
            f"{act:10s} {r['params']:14,d} {1e3 * r['step_s']:9.2f} {r['tok_s']:11.0f} "
            f"{r['tflops']:12.4f} {r['mfu']}"
        )
    if args.baseline:
        ratio = rows[args.act]["step_s"] / rows[args.baseline]["step_s"]
        print(f"step-time ratio {args.act}/{args.baseline}: {ratio:.3f}")


if __name__ == "__main__":
    main()
