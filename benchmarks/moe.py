"""The MoE 1b train step on 8 devices: per-device memory of the two dispatches, and
on an accelerator their step time, tokens/s and MFU.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/moe.py
    python benchmarks/moe.py --time --seqs_per_device 2       # on 8 GPUs

Model: ``configs/moe.py:size=1b`` (OLMoE-1B-7B: 16 layers, d_model 2048, 64 experts
of width 1024 (gated) or 1536, top-8, bf16, remat ``save_dots``, scanned layers).
Batch: the paper trains on 1024 x 4096 tokens per step on 64 GPUs, so 16 sequences
of 4096 per GPU per step; that is the default per-device batch here, as one
microbatch (the global batch is 8 x that). It does not fit one device with either
dispatch; ``--seqs_per_device 1`` is the same step in 16 accumulated microbatches.
The step is local to this script (the cross-entropy plus the MoE auxiliary loss,
``jax.value_and_grad``, the project's AdamW from ``polyjax.optim``):
``polyjax.train`` needs the data pipeline and ml_collections, which benchmarks
must not.

Memory: ``jit(step).lower(...).compile().memory_analysis()`` from abstract inputs
(nothing is allocated), per device: argument bytes (parameters, optimizer state,
batch) and temporary bytes. XLA:CPU has no grouped matmul: jax lowers
``ragged_dot`` to one masked dense product per expert (64 copies of the rows here),
so on CPU the dropless temporary bytes are far above what a GPU or TPU needs; the
capacity figures have no such caveat.

Time (``--time``, or any non-CPU backend): the median step of each dispatch at
equal tokens, tokens/s and MFU against the device kind's bf16 peak
(``polyjax.metrics.peak_flops``); FLOPs per token as ``polyjax.model.flops_per_token``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from polyjax import moe, optim
from polyjax import sharding as sh
from polyjax.metrics import peak_flops
from polyjax.model import ModelConfig, Transformer, flops_per_token, preset

# ----------------------------------------------------------------------------
# The step.


def model_config(act: str, dispatch: str) -> ModelConfig:
    d = preset("moe", "1b", act)
    d["moe"] = {**d["moe"], "dispatch": dispatch}
    return ModelConfig.from_dict(d)


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    def loss_fn(params, rest, tok_BxL):
        logits, aux = nnx.merge(graphdef, params, rest)(tok_BxL[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        ce = -jnp.mean(jnp.take_along_axis(logp, tok_BxL[:, 1:, None], axis=-1))
        return ce + aux["moe_aux_loss"]

    def step(params, opt_state, rest, tok_BxL):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tok_BxL)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def build(cfg: ModelConfig, mesh, expert_parallel: str, abstract: bool):
    """(graphdef, params, rest) of the model on ``mesh``: abstract (shapes with
    shardings) or allocated (``create_model``)."""
    if abstract:
        shard = sh.ActivationSharding(mesh, sh.DEFAULT_RULES)
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), shard=shard))
    else:
        model = sh.create_model(cfg, mesh, seed=0)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, moe.MoE):
            module.expert_parallel = expert_parallel
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if abstract:

        def placed(state):
            return jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                state,
                sh.model_shardings(state, mesh),
            )

        params, rest = placed(params), placed(rest)
    return graphdef, params, rest


def abstract_opt_state(tx: optax.GradientTransformation, params: nnx.State, mesh):
    """The optimizer state's shapes, the moments sharded as the parameters."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def placed(x):
        if isinstance(x, nnx.State):
            shardings = sh.model_shardings(x, mesh)
            return jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x, shardings
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    state = jax.eval_shape(tx.init, params)
    return jax.tree.map(placed, state, is_leaf=lambda x: isinstance(x, nnx.State))


@dataclasses.dataclass
class Row:
    mesh: str
    dispatch: str
    path: str
    argument: int = 0
    temp: int = 0
    step_s: float | None = None


def run_row(row: Row, args, mesh) -> Row:
    cfg = model_config(args.act, row.dispatch)
    batch = args.seqs_per_device * mesh.devices.size
    sh.validate(cfg, mesh, batch)
    timing = args.time or jax.default_backend() != "cpu"
    graphdef, params, rest = build(cfg, mesh, row.path, abstract=not timing)
    tx = optim.make_optimizer(optim.OptimConfig(lr=4e-4, final_lr=4e-5), 1000)
    opt_state = tx.init(params) if timing else abstract_opt_state(tx, params, mesh)
    tok_spec = jax.ShapeDtypeStruct(
        (batch, args.seq + 1), jnp.int32, sharding=sh.batch_sharding(mesh)
    )
    step = jax.jit(make_step(graphdef, tx), donate_argnums=(0, 1))
    compiled = step.lower(params, opt_state, rest, tok_spec).compile()
    mem = compiled.memory_analysis()
    row.argument, row.temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    if timing:
        tok = jax.random.randint(jax.random.key(0), tok_spec.shape, 0, cfg.vocab_size)
        tok = jax.device_put(tok, tok_spec.sharding)
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            params, opt_state, loss = compiled(params, opt_state, rest, tok)
            loss.block_until_ready()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        row.step_s = statistics.median(times)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act", default="polynorm")
    p.add_argument("--seqs_per_device", type=int, default=16, help="sequences per device")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument(
        "--meshes",
        default="fsdp=8;expert=8",
        help="';'-separated meshes of 'axis=size,...' (the config's is fsdp=8)",
    )
    p.add_argument("--dispatches", default="dropless,capacity")
    p.add_argument("--time", action="store_true", help="also run and time (default off on CPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    devices = jax.devices()
    kind = devices[0].device_kind
    print(f"device: {len(devices)} x {kind} ({jax.default_backend()}), jax {jax.__version__}")
    cfg = model_config(args.act, "dropless")
    tokens = args.seqs_per_device * args.seq
    print(
        f"model: moe 1b act={args.act} d_model={cfg.d_model} layers={cfg.n_layers} "
        f"experts={cfg.moe.num_experts} top_k={cfg.moe.top_k} d_expert={cfg.moe.d_expert} "
        f"dtype={cfg.dtype} remat={cfg.remat}; per device {args.seqs_per_device} x {args.seq} "
        f"= {tokens} tokens per step (one microbatch)"
    )
    rows = []
    for spec in args.meshes.split(";"):
        shape = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
        mesh = sh.make_mesh(shape)
        ep = mesh.shape["expert"]
        for dispatch in args.dispatches.split(","):
            paths = ["auto"]
            if dispatch == "dropless" and ep > 1:
                paths = ["gather", "all_to_all"]
            for path in paths:
                t0 = time.perf_counter()
                row = run_row(Row(spec, dispatch, path), args, mesh)
                rows.append(row)
                print(
                    f"  {spec:10s} {dispatch:9s} {path:11s} argument "
                    f"{row.argument / 2**30:8.2f} GiB  temp {row.temp / 2**30:9.2f} GiB"
                    + (f"  step {1e3 * row.step_s:.1f} ms" if row.step_s else "")
                    + f"  (compiled in {time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    timed = [r for r in rows if r.step_s]
    if not timed:
        print(
            "step time, tokens/s and MFU: not measured (CPU; run with --time, or on a GPU "
            "or TPU, where dropless (ragged_dot) and capacity (einsum) are timed at equal "
            "tokens)"
        )
        return
    peak = peak_flops(kind)
    per_token = flops_per_token(cfg, args.seq)
    for r in timed:
        rate = tokens * len(devices) / r.step_s
        mfu = f"{100 * rate * per_token / (peak * len(devices)):.1f}%" if peak else "n/a"
        print(f"  {r.mesh:10s} {r.dispatch:9s} {r.path:11s} {rate:12.0f} tokens/s  MFU {mfu}")


if __name__ == "__main__":
    main()
