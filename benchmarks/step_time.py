"""Train-step time, tokens/s and MFU of a preset, and PolyNorm vs SwiGLU in one process.

One step = forward + backward + AdamW update, jitted, parameters sharded over a
data-parallel mesh of all local devices. Model FLOPs per token follow PaLM
(appendix B): 6 N + 12 n_layers d_model seq, N the active non-embedding
parameters (the head included), no discount for the causal mask. MFU is against
the bf16 dense peak of the device kind (n/a on CPU or an unknown device).

    python benchmarks/step_time.py --family dense --size tiny --act polynorm --baseline swiglu
    python benchmarks/step_time.py --size 1b --act polynorm --baseline '' --kernel pallas
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from polyjax import sharding
from polyjax.metrics import peak_flops
from polyjax.model import ModelConfig, flops_per_token, param_counts, preset


def measure(cfg: ModelConfig, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """Median step time (s) of fwd+bwd+AdamW on random tokens."""
    mesh = sharding.make_mesh({"data": -1})
    sharding.validate(cfg, mesh, batch)
    model = sharding.create_model(cfg, mesh, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(params, rest, tok):
        logits, aux = nnx.merge(graphdef, params, rest)(tok[:, :-1])
        logp = jax.nn.log_softmax(logits)
        ce = -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1))
        return ce + aux.get("moe_aux_loss", 0.0)

    @jax.jit
    def step(params, opt_state, rest, tok):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tok)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tok = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    tok = jax.device_put(tok, sharding.batch_sharding(mesh))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, rest, tok)
        loss.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "loss": float(loss)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="dense", choices=("dense", "moe"))
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "1b"))
    p.add_argument("--act", default="polynorm")
    p.add_argument("--baseline", default="swiglu", help="'' to skip the comparison")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
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
    rows = {}
    for act in acts:
        d = preset(args.family, args.size, act)
        d.update({k: v for k, v in (("dtype", args.dtype), ("remat", args.remat)) if v})
        if args.kernel:
            d["activation"] = {**d["activation"], "kernel": args.kernel}
        cfg = ModelConfig.from_dict(d)
        seq = args.seq or cfg.max_seq_len
        r = measure(cfg, args.batch, seq, args.steps, args.warmup)
        tokens = args.batch * seq
        r["params"] = param_counts(cfg)["total"]
        r["tok_s"] = tokens / r["step_s"]
        r["tflops"] = flops_per_token(cfg, seq) * tokens / r["step_s"] / 1e12 / len(devices)
        r["mfu"] = f"{100 * r['tflops'] * 1e12 / peak:.1f}%" if peak else "n/a"
        r["cfg"] = cfg
        rows[act] = r
    cfg = rows[args.act]["cfg"]
    print(
        f"config: {args.family}/{args.size} d_model={cfg.d_model} layers={cfg.n_layers} "
        f"dtype={cfg.dtype} remat={cfg.remat} scan={cfg.scan_layers} "
        f"kernel={cfg.activation.kernel} batch={args.batch} "
        f"seq={args.seq or cfg.max_seq_len} steps={args.steps} (median), fwd+bwd+AdamW"
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
