"""Study 6 (Figures 6 and 7): the effective rank of every FFN weight by layer, and the
cosine similarity of the block outputs of every pair of layers, from the trained
checkpoints of the ``activations`` study (dense, Figure 6a-b and 7a-b) and of the
MoE study's SwiGLU and PolyNorm arms (Figure 6c-d and 7c-d), each beside the same
quantity for the same model at its initialisation (same shapes, same seed).

Effective rank is reported as the change from initialisation: a random matrix
already has a rank near its smaller side, and the gated SwiGLU's narrower matrices
have a lower one, so the raw numbers mostly measure shape. Similarity is over the
block outputs only (not the embedding).

Writes erank.csv, erank.md, erank.png, similarity.md and similarity.png into the
output folder (the trained studies' tables go to <out>/activations and <out>/moe).
"""

from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments import study
from experiments.studies import STUDIES
from polyjax import sharding as shd
from polyjax.analysis import effective_rank, layer_similarity
from polyjax.config import Spec
from polyjax.data import make_pipeline
from polyjax.train import restore_model

FFN_WEIGHTS = ("w_in", "w_up", "w_out")
SIMILARITY_BATCHES = 8  # validation batches the similarity averages over


def moe_study() -> study.Study:
    """The MoE study's two MoE arms (the panels c-d of Figures 6 and 7)."""
    moe = STUDIES["moe"]
    arms = tuple(a for a in moe.arms if a.family == "moe" and not a.overrides)
    return study.Study("moe", moe.title, moe.paper, arms, moe.reference)


def validation_batches(spec: Spec, n: int = SIMILARITY_BATCHES) -> list[dict]:
    pipeline = make_pipeline(
        spec.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    sharding = shd.batch_sharding(spec.mesh)
    return [shd.put_batch(b, sharding) for b in pipeline.eval_batches(n)]


def load_trained(spec: Spec, workdir: pathlib.Path, n: int = SIMILARITY_BATCHES):
    """The model of the newest intact checkpoint in ``workdir``, and ``n`` validation batches."""
    model, _ = restore_model(spec, workdir)
    return model, validation_batches(spec, n)


def initial_model(spec: Spec):
    """The run's model at step 0 (the trainer's init with the run's seed)."""
    return shd.create_model(spec.model, spec.mesh, spec.rules, spec.train.seed)


def ffn_ranks(model) -> dict[str, list[float]]:
    """Effective rank of each FFN weight, layer by layer (an MoE layer: the mean
    over its experts of each expert's matrix)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = params["layers"]
    blocks = (
        [layers[i] for i in sorted(layers)] if isinstance(layers, dict) and 0 in layers else None
    )
    if blocks is None:  # scanned layers: every leaf has a leading layer axis
        n = model.cfg.n_layers
        blocks = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]
    out: dict[str, list[float]] = {}
    for block in blocks:
        ffn = block["ffn"]
        for name in FFN_WEIGHTS:
            if name not in ffn:
                continue
            w = np.asarray(ffn[name], np.float32)
            rank = (
                effective_rank(w) if w.ndim == 2 else float(np.mean([effective_rank(m) for m in w]))
            )
            out.setdefault(name, []).append(rank)
    return out


def hidden_similarity(model, batches) -> np.ndarray:
    """Layer-by-layer cosine similarity of the block outputs (n_layers x n_layers;
    the embedding output is left out), over the tokens of ``batches``."""
    sims, weights = [], []
    for batch in batches:
        _, aux = model(
            batch["inputs"],
            positions_BxL=batch["positions"],
            segment_ids_BxL=batch["segment_ids"],
            return_hidden=True,
        )
        h = np.asarray(aux["hidden_states"], np.float32)[1:]  # block outputs: layers x B x L x D
        mask = np.asarray(batch["weights"]).reshape(-1) > 0
        sims.append(layer_similarity(h.reshape(h.shape[0], -1, h.shape[-1]), mask))
        weights.append(mask.sum())
    return np.average(np.stack(sims), axis=0, weights=weights)


def off_diagonal_mean(sim: np.ndarray) -> float:
    return float(sim[~np.eye(len(sim), dtype=bool)].mean())


def measure(
    s: study.Study, out: pathlib.Path, size: str, seeds: Sequence[int], extra: Mapping[str, Any]
) -> dict[str, dict]:
    """Train (or reuse) study ``s`` at the shared lr, then per arm: the ranks and
    similarities of the trained and of the initial models, stacked over seeds."""
    study.run(s, out / s.name, size=size, seeds=seeds, extra=extra, runs_root=out.parent / "_runs")
    found: dict[str, dict] = {}
    for arm in s.arms:
        per_seed = []
        for seed in seeds:
            run = study.make_run(s, arm, size, seed, extra, study.Controls(), out.parent / "_runs")
            spec = Spec.from_config(run.cfg)
            trained, batches = load_trained(spec, run.workdir)
            init = initial_model(spec)
            per_seed.append(
                {
                    "rank": ffn_ranks(trained),
                    "rank_init": ffn_ranks(init),
                    "sim": hidden_similarity(trained, batches),
                    "sim_init": hidden_similarity(init, batches),
                }
            )
        found[arm.label] = {
            "family": arm.family,
            "rank": {k: np.array([p["rank"][k] for p in per_seed]) for k in per_seed[0]["rank"]},
            "rank_init": {
                k: np.array([p["rank_init"][k] for p in per_seed]) for k in per_seed[0]["rank"]
            },
            "sim": np.mean([p["sim"] for p in per_seed], axis=0),
            "sim_init": np.mean([p["sim_init"] for p in per_seed], axis=0),
            "sim_seeds": [off_diagonal_mean(p["sim"]) for p in per_seed],
            "sim_init_seeds": [off_diagonal_mean(p["sim_init"]) for p in per_seed],
        }
    return found


def main(
    out: str | pathlib.Path,
    *,
    size: str = "cpu",
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    controls: study.Controls | None = None,
) -> None:
    """``controls`` is accepted for the launcher's sake: the analyses read the
    shared-lr checkpoints."""
    del controls
    out = pathlib.Path(out)
    found = {
        **{
            f"dense {k}": v
            for k, v in measure(STUDIES["activations"], out, size, seeds, extra).items()
        },
        **{f"MoE {k}": v for k, v in measure(moe_study(), out, size, seeds, extra).items()},
    }
    _write(out, found, len(seeds))


def _write(out: pathlib.Path, found: dict, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for arm, f in found.items():
        for weight, r in f["rank"].items():
            r0 = f["rank_init"][weight]
            for layer in range(r.shape[1]):
                d = r[:, layer] - r0[:, layer]
                rows.append(
                    {
                        "arm": arm,
                        "weight": weight,
                        "layer": layer,
                        "erank_init": float(r0[:, layer].mean()),
                        "erank": float(r[:, layer].mean()),
                        "delta": float(d.mean()),
                        "delta_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                    }
                )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "erank.csv").write_text(buf.getvalue())

    weights = [w for w in FFN_WEIGHTS if any(w in f["rank"] for f in found.values())]
    md = [
        f"## Effective rank of the FFN weights (Figure 6), {n_seeds} seeds",
        "",
        "Per weight: the effective rank at initialisation (same shapes and seed) and its "
        "change after training, both the mean over layers (MoE: over experts too); the "
        "change as mean ± std over seeds.",
        "",
        "| arm | " + " | ".join(f"{w} init | {w} Δ" for w in weights) + " |",
        "|---|" + "---|---|" * len(weights),
    ]
    for arm, f in found.items():
        cells = []
        for w in weights:
            if w not in f["rank"]:
                cells += ["-", "-"]
                continue
            d = (f["rank"][w] - f["rank_init"][w]).mean(1)
            sd = d.std(ddof=1) if len(d) > 1 else 0.0
            cells += [f"{f['rank_init'][w].mean():.1f}", f"{d.mean():+.2f} ± {sd:.2f}"]
        md.append(f"| {arm} | " + " | ".join(cells) + " |")
    (out / "erank.md").write_text("\n".join(md) + "\n")

    families = [fam for fam in ("dense", "moe") if any(f["family"] == fam for f in found.values())]
    fig, axes = plt.subplots(
        len(families),
        len(weights),
        figsize=(4.5 * len(weights), 3.6 * len(families)),
        squeeze=False,
    )
    for row, fam in enumerate(families):
        for ax, weight in zip(axes[row], weights, strict=True):
            for arm, f in found.items():
                if f["family"] != fam or weight not in f["rank"]:
                    continue
                d = f["rank"][weight] - f["rank_init"][weight]
                ax.errorbar(
                    np.arange(d.shape[1]),
                    d.mean(0),
                    yerr=d.std(0),
                    marker="o",
                    capsize=3,
                    label=arm,
                )
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_title(f"{fam}: erank({weight}) − erank at init")
            ax.set_xlabel("layer")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "erank.png", dpi=80)
    plt.close(fig)

    md = [
        f"## Layer-wise cosine similarity of the block outputs (Figure 7), {n_seeds} seeds",
        "",
        "Mean over the pairs of distinct blocks (the embedding output left out; lower: the "
        "blocks' outputs differ more), trained and at initialisation (same seed), mean ± std "
        "over seeds.",
        "",
        "| arm | trained | at init | trained − init |",
        "|---|---|---|---|",
    ]
    for arm, f in found.items():
        tr, ini = np.array(f["sim_seeds"]), np.array(f["sim_init_seeds"])
        sd = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0
        md.append(
            f"| {arm} | {tr.mean():.3f} ± {sd(tr):.3f} | {ini.mean():.3f} ± {sd(ini):.3f} "
            f"| {(tr - ini).mean():+.3f} ± {sd(tr - ini):.3f} |"
        )
    (out / "similarity.md").write_text("\n".join(md) + "\n")

    names = list(found)
    fig, axes = plt.subplots(
        2, len(names), figsize=(2.6 * len(names) + 1, 5.4), squeeze=False, layout="constrained"
    )
    for col, arm in enumerate(names):
        for row, key in enumerate(("sim", "sim_init")):
            s = found[arm][key]
            ax = axes[row][col]
            im = ax.imshow(s, vmin=0, vmax=1, cmap="viridis")
            ticks = range(len(s))
            ax.set_xticks(ticks, [str(i + 1) for i in ticks])
            ax.set_yticks(ticks, [str(i + 1) for i in ticks])
            ax.set_title(f"{arm}\n{'trained' if key == 'sim' else 'at init'}", fontsize=8)
            ax.set_xlabel("block")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7)
    fig.savefig(out / "similarity.png", dpi=80)
    plt.close(fig)
