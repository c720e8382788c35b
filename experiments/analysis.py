"""Study 6 (Figures 6 and 7): the effective rank of every FFN weight by layer, and the
cosine similarity of the hidden states of every pair of layers, from the trained
checkpoints of the ``activations`` study (trained first if they are missing).

Writes erank.csv, erank.md, erank.png, similarity.md and similarity.png into the
output folder (the activations study's table and curves go to <out>/activations).
"""

from __future__ import annotations

import csv
import io
import json
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


def load_trained(spec: Spec, workdir: pathlib.Path):
    """The model of the newest intact checkpoint in ``workdir``, and its validation batches."""
    model, _ = restore_model(spec, workdir)
    pipeline = make_pipeline(
        spec.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    sharding = shd.batch_sharding(spec.mesh)
    batches = [shd.put_batch(b, sharding) for b in pipeline.eval_batches(spec.train.eval_batches)]
    return model, batches


def ffn_ranks(model) -> dict[str, list[float]]:
    """Effective rank of each FFN weight, layer by layer (experts averaged)."""
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
    """Layer-by-layer cosine similarity of the hidden states (the embedding output and
    each block's output), over the tokens of the validation batches."""
    sims, weights = [], []
    for batch in batches:
        _, aux = model(
            batch["inputs"],
            positions_BxL=batch["positions"],
            segment_ids_BxL=batch["segment_ids"],
            return_hidden=True,
        )
        h = np.asarray(aux["hidden_states"], np.float32)  # (layers + 1) x B x L x D
        mask = np.asarray(batch["weights"]).reshape(-1) > 0
        sims.append(layer_similarity(h.reshape(h.shape[0], -1, h.shape[-1]), mask))
        weights.append(mask.sum())
    return np.average(np.stack(sims), axis=0, weights=weights)


def main(
    out: str | pathlib.Path,
    *,
    size: str = "cpu",
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    controls: study.Controls | None = None,
) -> None:
    out = pathlib.Path(out)
    acts = STUDIES["activations"]
    study.run(
        acts,
        out / "activations",
        size=size,
        seeds=seeds,
        extra=extra,
        runs_root=out.parent / "_runs",
    )
    index = json.loads((out / "activations" / "runs.json").read_text())
    ranks: dict[str, dict[str, np.ndarray]] = {}
    sims: dict[str, np.ndarray] = {}
    for arm in acts.arms:
        per_seed_ranks, per_seed_sims = [], []
        for seed in seeds:
            spec = Spec.from_config(acts.config(arm, size, seed, extra))
            workdir = pathlib.Path(index[f"{arm.label}/seed{seed}"])
            model, batches = load_trained(spec, workdir)
            per_seed_ranks.append(ffn_ranks(model))
            per_seed_sims.append(hidden_similarity(model, batches))
        ranks[arm.label] = {k: np.stack([r[k] for r in per_seed_ranks]) for k in per_seed_ranks[0]}
        sims[arm.label] = np.mean(per_seed_sims, axis=0)
    _write(out, ranks, sims, len(seeds))


def _write(out: pathlib.Path, ranks: dict, sims: dict, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for arm, by_weight in ranks.items():
        for weight, r in by_weight.items():
            for layer in range(r.shape[1]):
                rows.append(
                    {
                        "arm": arm,
                        "weight": weight,
                        "layer": layer,
                        "erank": float(r[:, layer].mean()),
                        "erank_std": float(r[:, layer].std()),
                    }
                )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "erank.csv").write_text(buf.getvalue())

    weights = [w for w in FFN_WEIGHTS if any(w in r for r in ranks.values())]
    md = [
        f"## Effective rank of the FFN weights (Figure 6), mean over {n_seeds} seeds and layers",
        "",
        "| arm | " + " | ".join(weights) + " |",
        "|---|" + "---|" * len(weights),
    ]
    for arm, by_weight in ranks.items():
        cells = [
            f"{by_weight[w].mean():.1f} ± {by_weight[w].mean(1).std():.1f}"
            if w in by_weight
            else "-"
            for w in weights
        ]
        md.append(f"| {arm} | " + " | ".join(cells) + " |")
    (out / "erank.md").write_text("\n".join(md) + "\n")

    fig, axes = plt.subplots(1, len(weights), figsize=(5 * len(weights), 4), squeeze=False)
    for ax, weight in zip(axes[0], weights, strict=True):
        for arm, by_weight in ranks.items():
            if weight in by_weight:
                r = by_weight[weight]
                ax.errorbar(
                    np.arange(r.shape[1]),
                    r.mean(0),
                    yerr=r.std(0),
                    marker="o",
                    capsize=3,
                    label=arm,
                )
        ax.set_title(f"effective rank of {weight}")
        ax.set_xlabel("layer")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "erank.png", dpi=110)
    plt.close(fig)

    md = [
        f"## Layer-wise cosine similarity of hidden states (Figure 7), mean over {n_seeds} seeds",
        "",
        "Mean over all pairs of distinct layers (lower: layers differ more).",
        "",
        "| arm | mean off-diagonal similarity |",
        "|---|---|",
    ]
    fig, axes = plt.subplots(
        1, len(sims), figsize=(3.2 * len(sims) + 1, 3.4), squeeze=False, layout="constrained"
    )
    for ax, (arm, s) in zip(axes[0], sims.items(), strict=True):
        off = s[~np.eye(len(s), dtype=bool)]
        md.append(f"| {arm} | {off.mean():.3f} |")
        im = ax.imshow(s, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(s)))
        ax.set_yticks(range(len(s)))
        ax.set_title(arm)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(out / "similarity.png", dpi=110)
    plt.close(fig)
    (out / "similarity.md").write_text("\n".join(md) + "\n")
