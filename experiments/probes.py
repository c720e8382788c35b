"""Measurements behind the MoE and init-scale explanations in experiments/README.md.

    python launch.py --experiment probes --size cpu --seeds 0 --workdir runs/experiments/probes

1. ``init.md``: at initialisation (seed by seed, on the validation batches), for each
   activation of the dense studies: the RMS of the FFN's output (what each block adds
   to the residual stream) against the RMS of the block's input; for the MoE arms the
   same, and the sum of the top-k gates (softmax over all experts, not renormalised).
2. ``scaled.md``: a dense SwiGLU and a dense PolyNorm trained with their FFN output
   multiplied by a constant (default 0.16, about what unnormalised top-2-of-8 gates
   leave at init), against the same arms unscaled (the activations study's runs):
   the report-half validation loss at each evaluation.
3. ``loads.md``: the MoE study's expert loads from its runs' metrics: per layer the
   smallest and largest share at the last step, and the smallest share any expert
   had at any logged step of the second half of training (a nearly dead expert).

The scaled runs wrap each block's FFN in ``ScaledFFN`` and run their own short loop
on the trainer's jitted steps (``polyjax.train.make_steps``): nothing in the model or
its config changes, so these runs are not study runs and are not keyed with them.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import stats, study
from experiments.studies import STUDIES
from polyjax import metrics as mx
from polyjax import sharding as shd
from polyjax.config import Spec
from polyjax.data import make_pipeline
from polyjax.moe import MoE, route
from polyjax.train import make_steps

DENSE_ACTS = (
    "swiglu",
    "gelu",
    "relu",
    "relu2",
    "polyrelu",
    "polyprelu",
    "polynorm",
    "polyrelu_norm",
)
SCALE = 0.16
PROBE_BATCHES = 4


class ScaledFFN(nnx.Module):
    """A block's FFN with its output multiplied by ``scale`` (a constant)."""

    def __init__(self, inner: nnx.Module, scale: float):
        self.inner, self.scale = inner, scale

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.inner(x_BxLxD) * self.scale


def _rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


def init_stats(spec: Spec, batches: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
    """At init: the mean over layers and batches of the block input's RMS, the FFN
    output's RMS and (MoE) the mean sum of the top-k gates per token."""
    model = shd.create_model(spec.model, spec.mesh, spec.rules, spec.train.seed)
    found: dict[str, list[float]] = {"input_rms": [], "ffn_rms": [], "gate_sum": []}
    for b in batches:
        _, aux = model(
            b["inputs"],
            positions_BxL=b["positions"],
            segment_ids_BxL=b["segment_ids"],
            return_hidden=True,
        )
        for block, x in zip(model.layers, aux["hidden_states"][:-1], strict=True):
            h = x + block.attn(block.attn_norm(x), b["positions"], b["segment_ids"])
            z = block.ffn_norm(h)
            f = block.ffn(z)
            if isinstance(block.ffn, MoE):
                f = f[0]
                logits = z.reshape(-1, z.shape[-1]) @ block.ffn.router[...]
                gates, _, _ = route(logits, block.ffn.top_k, block.ffn.renormalize)
                found["gate_sum"].append(float(gates.sum(-1).mean()))
            found["input_rms"].append(_rms(x))
            found["ffn_rms"].append(_rms(f))
    return {k: float(np.mean(v)) for k, v in found.items() if v}


def train_scaled(spec: Spec, scale: float, eval_batches: int) -> list[dict]:
    """Train ``spec`` with every FFN output multiplied by ``scale``; returns the
    report-half validation loss at each of the config's evaluations."""
    model = shd.create_model(spec.model, spec.mesh, spec.rules, spec.train.seed)
    for block in model.layers:
        block.ffn = ScaledFFN(block.ffn, scale)
    steps = make_steps(spec, model)
    state = steps.init(*nnx.split(model, nnx.Param, ...)[1:])
    pipeline = make_pipeline(spec.data)
    data = pipeline.train_iter()
    evals = [shd.put_batch(b, steps.batch_sharding) for b in pipeline.eval_batches(eval_batches)]
    curve = []
    for step in range(1, spec.train.steps + 1):
        state, _ = steps.train(state, shd.put_batch(next(data), steps.batch_sharding))
        if step % spec.train.eval_every == 0 or step == spec.train.steps:
            sums = np.asarray(
                jax.device_get([steps.eval(state.params, state.rest, b) for b in evals])
            )
            curve.append({"step": step, **stats.halves(sums[:, 0], sums[:, 1])})
            print(f"  step {step}: report-half val loss {curve[-1]['report']:.4f}", flush=True)
    return curve


def _unscaled_curve(workdir: pathlib.Path) -> dict[int, float]:
    records = mx.read_jsonl(workdir / mx.JSONL)
    return {
        r["step"]: stats.halves(r["val_batch_ce"], r["val_batch_tokens"])["report"]
        for r in records
        if "val_batch_ce" in r
    }


def expert_loads(records: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """From a run's metrics records: the expert loads at the last logged step
    (layers x experts) and, per layer, the smallest share of any expert at any logged
    step in the second half of training (step >= last step / 2)."""
    logged = [r for r in records if "expert_load" in r]
    if not logged:
        raise ValueError("no expert_load in the metrics: not an MoE run")
    half = logged[-1]["step"] / 2
    late_T_L_E = np.asarray([r["expert_load"] for r in logged if r["step"] >= half])
    return np.asarray(logged[-1]["expert_load"]), late_T_L_E.min(axis=(0, 2))


def main(
    out: str | pathlib.Path,
    *,
    size: str = "cpu",
    seeds: Sequence[int] = (0,),
    extra: Mapping[str, Any] = MappingProxyType({}),
    scale: float = SCALE,
) -> None:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = out.parent / "_runs"
    controls = study.Controls()
    dense = study.Study("probe", "", "", tuple(study.Arm(a, a) for a in DENSE_ACTS), "swiglu")
    moe = STUDIES["moe"]
    moe_arms = [a for a in moe.arms if a.family == "moe"]

    # --- 1. At initialisation. ---------------------------------------------------
    rows = []
    for s, arms in ((dense, dense.arms), (moe, moe_arms)):
        for arm in arms:
            per_seed = []
            for seed in seeds:
                run = study.make_run(s, arm, size, seed, extra, controls, root)
                spec = Spec.from_config(run.cfg)
                pipeline = make_pipeline(spec.data)
                sharding = shd.batch_sharding(spec.mesh)
                batches = [shd.put_batch(b, sharding) for b in pipeline.eval_batches(PROBE_BATCHES)]
                per_seed.append(init_stats(spec, batches))
            row = {"arm": f"{arm.family} {arm.label}"}
            row |= {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
            rows.append(row)
            print(f"init {row}", flush=True)
    (out / "init.json").write_text(json.dumps(rows, indent=2))
    md = [
        f"## At initialisation (seeds {list(seeds)}, {PROBE_BATCHES} validation batches)",
        "",
        "RMS of the block input and of the FFN output, mean over layers; for MoE, the mean "
        "over tokens of the sum of the top-k gates.",
        "",
        "| arm | block input RMS | FFN output RMS | ratio | top-k gate sum |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        gate = f"{r['gate_sum']:.3f}" if "gate_sum" in r else "-"
        md.append(
            f"| {r['arm']} | {r['input_rms']:.3f} | {r['ffn_rms']:.4f} "
            f"| {r['ffn_rms'] / r['input_rms']:.4f} | {gate} |"
        )
    (out / "init.md").write_text("\n".join(md) + "\n")

    # --- 2. Dense FFNs with their output scaled. ------------------------------------
    results = {}
    for act in ("swiglu", "polynorm"):
        for seed in seeds:
            run = study.make_run(dense, study.Arm(act, act), size, seed, extra, controls, root)
            path = out / f"scaled-{act}-seed{seed}.json"
            if not path.exists():
                print(f"training dense {act} x {scale} seed {seed}", flush=True)
                spec = Spec.from_config(run.cfg)
                curve = train_scaled(spec, scale, spec.train.eval_batches)
                path.write_text(json.dumps(curve))
            scaled = {c["step"]: c["report"] for c in json.loads(path.read_text())}
            plain = _unscaled_curve(run.workdir) if (run.workdir / "summary.json").exists() else {}
            results[(act, seed)] = (scaled, plain)
    md = [
        f"## Dense FFN output multiplied by {scale} (seeds {list(seeds)})",
        "",
        "Report-half validation loss; Δ = scaled − unscaled (the activations study's run "
        "of the same seed), mean over seeds.",
        "",
        "| arm | step | unscaled | scaled | Δ |",
        "|---|---|---|---|---|",
    ]
    for act in ("swiglu", "polynorm"):
        steps = sorted(results[(act, seeds[0])][0])
        for step in steps:
            sc = [results[(act, s)][0][step] for s in seeds]
            pl = [results[(act, s)][1].get(step, np.nan) for s in seeds]
            md.append(
                f"| {act} | {step} | {np.mean(pl):.4f} | {np.mean(sc):.4f} "
                f"| {np.mean(sc) - np.mean(pl):+.4f} |"
            )
    (out / "scaled.md").write_text("\n".join(md) + "\n")

    # --- 3. MoE expert loads. -------------------------------------------------------
    md = [
        "## MoE expert loads",
        "",
        "Share of the (token, slot) assignments per expert (uniform: 1/E), per layer: "
        "smallest / largest at the last step, then [the smallest share of any expert at "
        "any logged step of the second half of training].",
        "",
    ]
    rows = []
    for arm in moe_arms:
        for seed in seeds:
            run = study.make_run(moe, arm, size, seed, extra, controls, root)
            if not (run.workdir / "summary.json").exists():
                continue
            load_L_E, late_min_L = expert_loads(mx.read_jsonl(run.workdir / mx.JSONL))
            cells = [
                f"{row.min():.3f} / {row.max():.3f} [{m:.3f}]"
                for row, m in zip(load_L_E, late_min_L, strict=True)
            ]
            rows.append((len(load_L_E), f"| {arm.label} | {seed} | " + " | ".join(cells) + " |"))
    if rows:
        width = rows[0][0]
        md.append("| arm | seed | " + " | ".join(f"layer {i}" for i in range(width)) + " |")
        md.append("|---" * (width + 2) + "|")
        md += [line for _, line in rows]
    else:
        md.append("(No finished run of the MoE study at this size and these seeds.)")
    (out / "loads.md").write_text("\n".join(md) + "\n")
    for name in ("init.md", "scaled.md", "loads.md"):
        print((out / name).read_text())
