"""What every training study shares: run its arms x seeds through the trainer, each in
its own workdir, then tabulate and plot what they logged (Markdown, CSV, PNG).

A run whose ``summary.json`` exists is not run again, and an interrupted one resumes
from its checkpoints, so a study can be stopped and restarted at will.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from configs import dense, moe
from polyjax import metrics as mx
from polyjax.config import Spec
from polyjax.train import train

FAMILIES = {"dense": dense.get_config, "moe": moe.get_config}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One curve of a figure: a family's config (``configs/<family>.py``) with
    activation ``act`` at the study's size, and ``overrides`` (field -> value)."""

    label: str
    act: str
    family: str = "dense"
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper: str  # the figures and tables it reproduces
    arms: tuple[Arm, ...]
    reference: str  # the arm that the others are compared with

    def config(
        self, arm: Arm, size: str, seed: int, extra: Mapping[str, Any] = MappingProxyType({})
    ):
        """The ml_collections config of one run (``extra``: field -> value, for every arm)."""
        cfg = FAMILIES[arm.family](f"act={arm.act},size={size}")
        cfg.lock()
        seeds = {"train.seed": seed, "data.seed": seed}
        cfg.update_from_flattened_dict({**dict(arm.overrides), **extra, **seeds})
        cfg.name = f"{self.name}-{arm.label}-seed{seed}"
        return cfg


def run_dir(runs_root: pathlib.Path, cfg) -> pathlib.Path:
    """Where a run lives: ``<activation>-<hash of the config>/seed<seed>``, the hash
    taken over everything but the name and the seeds, so that studies sharing an arm
    (PolyReLU r=3 is in four of them) train it once, whatever they call it."""
    plain = cfg.to_dict()
    plain.pop("name")
    seed = plain["train"].pop("seed")
    plain["data"].pop("seed")
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]
    return runs_root / f"{plain['model']['activation']['name']}-{digest}" / f"seed{seed}"


def run(
    study: Study,
    out: str | pathlib.Path,
    *,
    size: str = "cpu",
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    runs_root: str | pathlib.Path | None = None,
) -> list[dict]:
    """Train every arm for every seed (skipping finished runs) under ``runs_root``
    (default: the ``_runs`` folder beside ``out``), then write the table and plots
    into ``out``; returns the table's rows."""
    out = pathlib.Path(out)
    root = pathlib.Path(runs_root) if runs_root else out.parent / "_runs"
    planned = []
    for arm in study.arms:
        for seed in seeds:
            cfg = study.config(arm, size, seed, extra)
            planned.append((arm, seed, Spec.from_config(cfg), run_dir(root, cfg)))
    for i, (arm, seed, spec, workdir) in enumerate(planned):
        tag = f"[{i + 1}/{len(planned)}] {arm.label} seed {seed}"
        if (workdir / "summary.json").exists():
            print(f"{tag}: done before ({workdir})", flush=True)
            continue
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "train.log", "a") as log:
            result = train(spec, workdir, out=log)
        print(f"{tag}: val loss {result.get('val_loss', float('nan')):.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    index = {f"{arm.label}/seed{seed}": str(workdir) for arm, seed, _, workdir in planned}
    (out / "runs.json").write_text(json.dumps(index, indent=2))
    return report(study, out, seeds)


def _curves(workdir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    records = mx.read_jsonl(workdir / mx.JSONL)
    curves = {}
    for key in ("loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in records if key in r]
        curves[key] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float))
    return curves


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def report(study: Study, out: str | pathlib.Path, seeds: Sequence[int]) -> list[dict]:
    """Table (mean ± std over seeds, and the paired difference to the reference arm)
    and the three curves of the paper's figures (training loss, validation loss,
    validation perplexity), from the runs' metrics.jsonl files."""
    out = pathlib.Path(out)
    index = json.loads((out / "runs.json").read_text())
    runs = {
        (arm.label, s): _curves(pathlib.Path(index[f"{arm.label}/seed{s}"]))
        for arm in study.arms
        for s in seeds
    }
    final = {key: {k: c[k][1][-1] for k in c} for key, c in runs.items()}
    rows = []
    for arm in study.arms:
        per_seed = [final[(arm.label, s)] for s in seeds]
        delta = [
            final[(arm.label, s)]["val_loss"] - final[(study.reference, s)]["val_loss"]
            for s in seeds
        ]
        tl, tl_sd = _mean_std([r["loss"] for r in per_seed])
        vl, vl_sd = _mean_std([r["val_loss"] for r in per_seed])
        ppl, ppl_sd = _mean_std([math.exp(r["val_loss"]) for r in per_seed])
        d, d_sd = _mean_std(delta)
        rows.append(
            {
                "arm": arm.label,
                "seeds": len(seeds),
                "train_loss": tl,
                "train_loss_std": tl_sd,
                "val_loss": vl,
                "val_loss_std": vl_sd,
                "val_ppl": ppl,
                "val_ppl_std": ppl_sd,
                "delta_val_loss": d,
                "delta_val_loss_std": d_sd,
            }
        )
    _write_table(study, out, rows)
    _plot(study, out, runs, seeds)
    return rows


def _write_table(study: Study, out: pathlib.Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "table.csv").write_text(buf.getvalue())
    md = [
        f"## {study.title} ({study.paper})",
        "",
        f"Final values, mean ± std over {rows[0]['seeds']} seeds; Δ is the paired "
        f"difference (same seed) of the validation loss to `{study.reference}`.",
        "",
        "| arm | train loss | val loss | val PPL | Δ val loss |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['arm']} | {r['train_loss']:.4f} ± {r['train_loss_std']:.4f} "
        f"| {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} "
        f"| {r['val_ppl']:.2f} ± {r['val_ppl_std']:.2f} "
        f"| {r['delta_val_loss']:+.4f} ± {r['delta_val_loss_std']:.4f} |"
        for r in rows
    ]
    (out / "table.md").write_text("\n".join(md) + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2))


def _plot(study: Study, out: pathlib.Path, runs: dict, seeds: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "training loss", False),
        ("val_loss", "validation loss", False),
        ("val_loss", "validation PPL", True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title, ppl) in zip(axes, panels, strict=True):
        for arm in study.arms:
            steps = runs[(arm.label, seeds[0])][key][0]
            n = min(len(runs[(arm.label, s)][key][1]) for s in seeds)
            ys = np.stack([runs[(arm.label, s)][key][1][:n] for s in seeds])
            ys = np.exp(ys) if ppl else ys
            mean = ys.mean(0)
            (line,) = ax.plot(steps[:n], mean, label=arm.label)
            ax.fill_between(steps[:n], ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(f"{study.title} ({study.paper}); mean and min-max over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
