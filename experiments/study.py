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
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from configs import dense, moe
from experiments import downstream
from experiments import stats as st
from experiments.progress import RunLog, StudyProgress
from polyjax import metrics as mx
from polyjax import nonfinite
from polyjax.config import InputError, Spec, TrainConfig
from polyjax.data import DataConfig, make_pipeline
from polyjax.model import ModelConfig, MoEConfig
from polyjax.optim import OptimConfig
from polyjax.train import train
from polyjax.workdir import held as held_by_a_run

WAIT_S = 30.0  # train_planned: how often a process with nothing free looks again
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


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _defaults() -> dict[str, Any]:
    """Every config field that has a default, flattened (``model.activation.order``: 3)."""

    def fields(cls, prefix):
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                continue
            if dataclasses.is_dataclass(value):
                out.update(fields(type(value), f"{prefix}{f.name}."))
            else:
                out[f"{prefix}{f.name}"] = value
        return out

    out = {}
    for section, cls in (("model", ModelConfig), ("data", DataConfig)):
        out.update(fields(cls, f"{section}."))
    out.update(fields(MoEConfig, "model.moe."))
    out.update(fields(OptimConfig, "optim.") | fields(TrainConfig, "train."))
    return out


def run_dir(runs_root: pathlib.Path, cfg) -> pathlib.Path:
    """Where a run lives: ``<activation>-<hash of the config>/seed<seed>``, the hash
    taken over everything but the name and the seeds, so that studies sharing an arm
    (PolyReLU r=3 is in four of them) train it once, whatever they call it.

    Only the fields that differ from their defaults enter the hash: a field added to
    the code later (at its default) keeps every finished run's key, so that a ladder
    built over several sessions finds its runs again. (A default changed in the code
    is not seen; the run's ``config.json`` records what it trained with.)"""
    flat = _flat(cfg.to_dict())
    for k in ("name", "train.seed", "data.seed"):
        flat.pop(k)
    defaults = _defaults()
    key = {k: v for k, v in flat.items() if k not in defaults or defaults[k] != v}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return runs_root / f"{flat['model.activation.name']}-{digest}" / f"seed{cfg.train.seed}"


@dataclasses.dataclass(frozen=True)
class Controls:
    """What a study controls for, beside its arms.

    ``lrs``: a learning-rate grid. Every arm also runs at each of these (the final
    lr keeps the config's ratio to the peak) on the first ``select_seeds`` seeds;
    its best lr (lowest loss on the selection half of the held-out windows) then
    runs on the remaining seeds. Empty: the config's lr only (the shared lr).
    ``full_eval``: evaluate on every held-out window (``train.eval_batches`` = all
    of them), split into a selection half (the first half of the batches) and a
    report half (the rest); the tables report the report half.
    ``tasks``: downstream lm-eval tasks scored on each final checkpoint.
    """

    lrs: tuple[float, ...] = ()
    select_seeds: int = 1
    full_eval: bool = True
    tasks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
    arm: Arm
    seed: int
    lr: float
    cfg: Any  # ml_collections.ConfigDict
    workdir: pathlib.Path
    rung: str = ""  # the scaling ladder's rung (experiments/ladder.py)

    @property
    def key(self) -> str:
        rung = f"{self.rung}/" if self.rung else ""
        return f"{rung}{self.arm.label}/lr{self.lr:g}/seed{self.seed}"


DIVERGED = "diverged.json"  # in a run's workdir: it stopped on a NaN/Inf (a finished run)


def held_out_batches(cfg) -> int:
    """How many evaluation batches the held-out windows of ``cfg``'s data fill."""
    data = DataConfig.from_dict(cfg.data.to_dict())
    key = json.dumps(dataclasses.asdict(data) | {"seed": 0}, sort_keys=True)
    if key not in _HELD_OUT:
        windows = make_pipeline(data).val.count
        _HELD_OUT[key] = -(-windows // data.global_batch)
    return _HELD_OUT[key]


_HELD_OUT: dict[str, int] = {}


def lr_overrides(cfg, lr: float) -> dict[str, float]:
    """The fields that move a run to peak lr ``lr``: the final lr keeps its ratio."""
    if lr == cfg.optim.lr:
        return {}
    ratio = cfg.optim.final_lr / cfg.optim.lr
    return {"optim.lr": lr, "optim.final_lr": float(f"{lr * ratio:.6g}")}


def make_run(
    study: Study,
    arm: Arm,
    size: str,
    seed: int,
    extra: Mapping[str, Any],
    controls: Controls,
    root: pathlib.Path,
    lr: float | None = None,
) -> Run:
    """One planned run: the arm's config at ``lr`` (None: the config's own)."""
    cfg = study.config(arm, size, seed, extra)
    lr = cfg.optim.lr if lr is None else lr
    changes = lr_overrides(cfg, lr)
    if controls.full_eval and "train.eval_batches" not in extra:
        changes["train.eval_batches"] = held_out_batches(cfg)
    cfg.update_from_flattened_dict(changes)
    return Run(arm, seed, lr, cfg, run_dir(root, cfg))


def finished(r: Run) -> bool:
    """Whether ``r`` ran to the end (a run that stopped on a NaN/Inf is finished:
    its ``diverged.json`` says where)."""
    return (r.workdir / "summary.json").exists() or (r.workdir / DIVERGED).exists()


def train_one(r: Run, progress: StudyProgress) -> None:
    """Train (or resume) ``r`` in its workdir, its log in ``train.log``; a run that
    stops on a NaN/Inf is finished with a ``diverged.json``."""
    label = f"{r.rung} {r.arm.label}".strip() + f" lr {r.lr:g} seed {r.seed}"
    r.workdir.mkdir(parents=True, exist_ok=True)
    progress.start(r.cfg, label)
    tag = f"[{progress.name} {progress.done + 1}/{progress.total}] {label}"
    with open(r.workdir / "train.log", "a") as log:
        try:
            out = RunLog(log, progress.step)
            result = train(Spec.from_config(r.cfg), r.workdir, out=out)
        except nonfinite.NonFiniteError as e:
            (r.workdir / DIVERGED).write_text(json.dumps({"step": e.step}))
            progress.message(f"{tag}: diverged at step {e.step}")
            return
        finally:
            progress.end()
    progress.message(f"{tag}: val loss {result.get('val_loss', float('nan')):.4f}")


Planner = Callable[[], tuple[list[Run], list[Run]]]


def train_planned(
    name: str,
    planner: Planner,
    run_missing: bool = True,
    progress: StudyProgress | None = None,
    after: Callable[[], Any] | None = None,
) -> list[Run]:
    """Train what ``planner()`` plans, one run at a time, asking it again after each
    (what comes next may depend on what has finished: the best lr of a grid), until
    every planned run has finished; returns the planned runs. ``planner()`` gives
    (the runs it knows, in training order; the runs it cannot know yet, for the
    progress's ETA only). ``after()``: called after each run trained.
    ``run_missing=False``: train nothing.

    Several processes may run the same command on one machine (or on hosts sharing
    the pool's disk): each trains the first planned run whose workdir no live
    process has locked, and waits (``WAIT_S``) while every run left is another's."""
    progress = progress or StudyProgress(name)
    first, waiting = True, False
    while True:
        known, forecast = planner()
        unique = list({r.workdir: r for r in known}.values())
        done = [r for r in unique if finished(r)]
        todo = [r for r in unique if not finished(r)]
        free = [r for r in todo if not held_by_a_run(r.workdir)]
        progress.plan(
            [r.cfg for r in done],
            [r.cfg for r in todo] + [r.cfg for r in forecast],
            processes=1 + len(todo) - len(free),  # this one and each holding a planned run
        )
        if first:
            left = len(todo) + len(forecast)
            what = "to train" if run_missing else "not finished, left out"
            progress.message(f"[{name}] {len(done)} runs finished before, {left} {what}")
            first = False
        if not todo or not run_missing:
            return known
        if not free:  # what is left is being trained by other processes: wait for them
            if not waiting:
                progress.message(
                    f"[{name}] the {len(todo)} run(s) planned now are other processes'; "
                    "waiting for them to finish"
                )
                waiting = True
            time.sleep(WAIT_S)
            continue
        waiting = False
        r = free[0]
        try:
            train_one(r, progress)
        except InputError:
            if held_by_a_run(r.workdir):
                continue  # another process locked it between the check and the start
            raise
        if not finished(r):
            raise RuntimeError(f"{r.workdir}: the run ended without a summary.json")
        if after:
            after()


def plan(
    study: Study,
    size: str,
    seeds: Sequence[int],
    extra: Mapping[str, Any],
    controls: Controls,
    root: pathlib.Path,
    partial: bool = False,
) -> tuple[list[Run], list[Run], dict[str, float]]:
    """The study's runs as far as its finished runs determine them, in three stages:
    1. every arm at the config's lr (the shared lr), every seed;
    2. every arm at each lr of the grid, on the first ``select_seeds`` seeds;
    3. every arm at its best lr (``best_lr`` on the selection half), the other seeds,
       once its grid (stages 1-2 on those seeds) has finished.
    Returns (the known runs, in that order; the stage-3 runs not known yet, at the
    shared lr as stand-ins for the ETA; each arm's best lr where known).
    ``partial``: the best lr over the grid's finished runs (a study cut short)."""
    known = [make_run(study, a, size, s, extra, controls, root) for a in study.arms for s in seeds]
    if not controls.lrs:
        return known, [], {}
    chosen = seeds[: controls.select_seeds]
    known += [
        make_run(study, a, size, s, extra, controls, root, lr)
        for a in study.arms
        for lr in controls.lrs
        for s in chosen
    ]
    best = {}
    for a in study.arms:
        runs = {r.key: r for r in known if r.arm == a and r.seed in chosen}
        if partial or all(finished(r) for r in runs.values()):
            grid = _grid(study, a, {k: r for k, r in runs.items() if finished(r)}, chosen)
            if grid:
                best[a.label] = st.best_lr(grid)
    forecast = []
    for a in study.arms:
        for s in seeds[controls.select_seeds :]:
            if a.label in best:
                known.append(make_run(study, a, size, s, extra, controls, root, best[a.label]))
            elif not partial:
                forecast.append(make_run(study, a, size, s, extra, controls, root))
    return known, forecast, best


def plan_and_train(
    study: Study,
    size: str,
    seeds: Sequence[int],
    extra: Mapping[str, Any],
    controls: Controls,
    root: pathlib.Path,
    run_missing: bool = True,
) -> tuple[dict[str, Run], dict[str, float]]:
    """Train the study's runs (``plan``) not finished before; return them by
    ``Run.key``, and each arm's best lr (empty without a grid).
    ``run_missing=False``: train nothing, return the finished runs only."""
    args = (study, size, seeds, extra, controls, root, not run_missing)
    train_planned(study.name, lambda: plan(*args)[:2], run_missing)
    known, _, best = plan(*args)
    return {r.key: r for r in known if run_missing or finished(r)}, best


def run(
    study: Study,
    out: str | pathlib.Path,
    *,
    size: str = "cpu",
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    runs_root: str | pathlib.Path | None = None,
    controls: Controls = Controls(),
    run_missing: bool = True,
) -> dict[str, list[dict]]:
    """Train every arm for every seed (skipping finished runs) under ``runs_root``
    (default: the ``_runs`` folder beside ``out``), with the ``controls``, then
    write the tables and plots into ``out``; returns the tables (``report``).
    ``run_missing=False``: tabulate the finished runs only (a study cut short; the
    shared-lr runs of every arm and seed must be among them)."""
    out = pathlib.Path(out)
    root = pathlib.Path(runs_root) if runs_root else out.parent / "_runs"
    runs, best = plan_and_train(study, size, seeds, extra, controls, root, run_missing)
    if controls.tasks:  # the runs of the tables: each arm at the shared and at its best lr
        base = {a.label: study.config(a, size, seeds[0], extra).optim.lr for a in study.arms}
        scored = [r for r in runs.values() if r.lr in (base[r.arm.label], best.get(r.arm.label))]
        for i, r in enumerate(scored):
            if not (r.workdir / DIVERGED).exists():
                print(f"[downstream {i + 1}/{len(scored)}] {r.key}", flush=True)
                downstream.score(r.workdir, controls.tasks)
    out.mkdir(parents=True, exist_ok=True)
    index = {
        k: {
            "workdir": str(r.workdir),
            "arm": r.arm.label,
            "lr": r.lr,
            "seed": r.seed,
            "shared": r.lr == study.config(r.arm, size, r.seed, extra).optim.lr,
            "tokens_per_step": _tokens_per_step(r.cfg),
        }
        for k, r in runs.items()
    }
    (out / "runs.json").write_text(json.dumps(index, indent=2))
    return report(study, out, seeds, controls)


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run logged: the training loss and the report-half validation loss at
    their steps, the final selection/report/all losses (inf: diverged)."""

    train_steps: np.ndarray
    train_loss: np.ndarray
    val_steps: np.ndarray
    val_report: np.ndarray
    final: dict[str, float]
    tokens_per_step: int
    diverged: bool
    workdir: pathlib.Path


def load_result(workdir: pathlib.Path, tokens_per_step: int) -> Result:
    records = mx.read_jsonl(workdir / mx.JSONL)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [
        (r["step"], st.halves(r["val_batch_ce"], r["val_batch_tokens"]))
        for r in records
        if "val_batch_ce" in r
    ]
    diverged = (workdir / DIVERGED).exists()
    inf = {"select": math.inf, "report": math.inf, "all": math.inf}
    return Result(
        train_steps=np.array([s for s, _ in train]),
        train_loss=np.array([v for _, v in train], float),
        val_steps=np.array([s for s, _ in evals]),
        val_report=np.array([h["report"] for _, h in evals], float),
        final=inf if diverged or not evals else evals[-1][1],
        tokens_per_step=tokens_per_step,
        diverged=diverged,
        workdir=workdir,
    )


def _tokens_per_step(cfg) -> int:
    return cfg.data.global_batch * cfg.data.seq_len


def _grid(study: Study, arm: Arm, runs: Mapping[str, Run], seeds: Sequence[int]):
    """{lr: [selection-half final loss of each seed]} over the runs of ``arm`` at
    every lr that ran on all of ``seeds``."""
    by_lr: dict[float, list[float]] = {}
    for r in runs.values():
        if r.arm == arm and r.seed in seeds:
            res = load_result(r.workdir, _tokens_per_step(r.cfg))
            by_lr.setdefault(r.lr, []).append(res.final["select"])
    return {lr: v for lr, v in sorted(by_lr.items()) if len(v) == len(seeds)}


def _scores(workdir: pathlib.Path) -> dict:
    path = workdir / downstream.SCORES
    return json.loads(path.read_text()) if path.exists() else {}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _compare(
    study: Study, results: Mapping[tuple[str, int], Result], seeds: Sequence[int]
) -> list[dict]:
    """One row per arm over ``results[(label, seed)]``: the report-half loss, its
    paired difference to the reference (its 95% t-interval, t and p over seeds; no
    verdict with fewer than ``stats.MIN_EVALS`` evaluations per curve or one seed),
    and the tokens each seed needs to reach the reference's final loss under that seed."""
    rows = []
    for arm in study.arms:
        res = [results[(arm.label, s)] for s in seeds]
        ref = [results[(study.reference, s)] for s in seeds]
        val = [r.final["report"] for r in res]
        delta = [a - b for a, b in zip(val, (r.final["report"] for r in ref), strict=True)]
        t, p = st.paired_t(delta)
        reach = [
            st.tokens_to_target(r.val_steps * r.tokens_per_step, r.val_report, f.final["report"])
            for r, f in zip(res, ref, strict=True)
        ]
        reached = [x for x in reach if x is not None]
        m, sd = _mean_std(val)
        d, d_sd = _mean_std(delta)
        low, high = st.mean_ci(delta) if arm.label != study.reference else (math.nan,) * 2
        evals = min(len(r.val_steps) for r in (*res, *ref))
        rows.append(
            {
                "arm": arm.label,
                "seeds": len(seeds),
                "train_loss": float(np.mean([r.train_loss[-1] for r in res])),
                "val_loss": m,
                "val_loss_std": sd,
                "val_ppl": float(np.mean(np.exp(val))),
                "delta": d,
                "delta_std": d_sd,
                "ci_low": low,
                "ci_high": high,
                "t": t,
                "p": p,
                "evals": evals,
                "verdict": "reference"
                if arm.label == study.reference
                else st.verdict(d, p, evals=evals, seeds=len(seeds)),
                "tokens_to_target": float(np.mean(reached)) if len(reached) == len(seeds) else None,
                "reached": len(reached),
                "diverged": sum(r.diverged for r in res),
            }
        )
    return rows


def report(
    study: Study, out: str | pathlib.Path, seeds: Sequence[int], controls: Controls = Controls()
) -> dict[str, list[dict]]:
    """The study's tables and curves from its runs' metrics.jsonl files: at the
    shared lr and (with an lr grid) at each arm's best lr; each row the report-half
    loss, the paired difference to the reference with t and p, tokens-to-target."""
    out = pathlib.Path(out)
    index = json.loads((out / "runs.json").read_text())
    runs = {
        (e["arm"], e["lr"], e["seed"]): load_result(
            pathlib.Path(e["workdir"]), e["tokens_per_step"]
        )
        for e in index.values()
    }
    shared = {e["arm"]: e["lr"] for e in index.values() if e["shared"]}
    tables = {
        "shared": _compare(
            study, {(lab, s): runs[(lab, shared[lab], s)] for lab in shared for s in seeds}, seeds
        )
    }
    for row in tables["shared"]:
        row["lr"] = shared[row["arm"]]
    grid_rows, best = [], {}
    if controls.lrs:
        chosen = seeds[: controls.select_seeds]

        for arm in study.arms:
            grid = {
                lr: [runs[(arm.label, lr, s)].final["select"] for s in chosen]
                for lr in sorted({k[1] for k in runs if k[0] == arm.label})
                if all((arm.label, lr, s) in runs for s in chosen)
            }
            best[arm.label] = st.best_lr(grid)
            grid_rows.append(
                {
                    "arm": arm.label,
                    "best_lr": best[arm.label],
                    "edge": st.at_edge(best[arm.label], list(grid)),
                }
                | {f"{lr:g}": float(np.mean(v)) for lr, v in grid.items()}
            )
        if all((a.label, best[a.label], s) in runs for a in study.arms for s in seeds):
            tuned = {(lab, s): runs[(lab, best[lab], s)] for lab in best for s in seeds}
            tables["best"] = _compare(study, tuned, seeds)
            for row in tables["best"]:
                row["lr"] = best[row["arm"]]
    tables["grid"] = grid_rows
    if controls.tasks:
        for name, lrs in (("shared", shared), ("best", best if "best" in tables else {})):
            for row in tables.get(name, []):
                per_seed = [_scores(runs[(row["arm"], lrs[row["arm"]], s)].workdir) for s in seeds]
                for task in downstream.expand(controls.tasks):
                    row[f"acc:{task}"] = downstream.summarize(per_seed, task)
    _write_tables(study, out, tables, seeds, controls)
    _plot(study, out, {k: v for k, v in runs.items() if k[1] == shared[k[0]]}, seeds)
    return tables


def _fmt_tokens(row: dict, total: float) -> str:
    if row["tokens_to_target"] is None:
        return f"not reached ({row['reached']}/{row['seeds']})"
    return f"{row['tokens_to_target'] / 1e6:.3g} M ({row['tokens_to_target'] / total:.2f})"


def _fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def _fmt_ci(row: dict) -> str:
    low, high = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
    return "-" if not math.isfinite(low) else f"[{low:+.4f}, {high:+.4f}]"


def _comparison_md(study: Study, rows: list[dict], total_tokens: float) -> list[str]:
    extra = [k for k in rows[0] if k.startswith("acc:")]
    head = (
        "| arm | lr | val loss | val PPL | Δ vs ref | 95% CI of Δ | t | p | verdict "
        "| tokens to ref's loss |"
    )
    md = [head + "".join(f" {k[4:]} |" for k in extra), "|---" * (10 + len(extra)) + "|"]
    for r in rows:
        loss = "diverged" if r["diverged"] else f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f}"
        cells = [
            r["arm"],
            f"{r['lr']:g}",
            loss,
            f"{r['val_ppl']:.2f}",
            f"{r['delta']:+.4f} ± {r['delta_std']:.4f}",
            _fmt_ci(r),
            "-" if not math.isfinite(r["t"]) else f"{r['t']:+.2f}",
            _fmt_p(r["p"]),
            r["verdict"],
            _fmt_tokens(r, total_tokens),
            *(r[k] for k in extra),
        ]
        md.append("| " + " | ".join(cells) + " |")
    return md


def _write_tables(
    study: Study, out: pathlib.Path, tables: dict, seeds: Sequence[int], controls: Controls
) -> None:
    flat = [{"table": name, **row} for name in ("shared", "best") for row in tables.get(name, [])]
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in flat for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    (out / "table.csv").write_text(buf.getvalue())
    (out / "table.json").write_text(json.dumps(tables, indent=2))
    index = json.loads((out / "runs.json").read_text())
    total = max(e["tokens_per_step"] for e in index.values()) * max(
        (_last_step(pathlib.Path(e["workdir"])) for e in index.values()), default=1
    )
    md = [
        f"## {study.title} ({study.paper})",
        "",
        f"Validation loss on the report half of the held-out windows at the last step, mean ± "
        f"std over {len(seeds)} seeds. Δ: the paired difference (same seed) to "
        f"`{study.reference}`, mean ± std, its 95% t-interval, and the paired t-test over "
        "seeds (t, two-sided p); the verdict says better or worse at p < 0.05 (none with "
        f"fewer than {st.MIN_EVALS} evaluations per curve, or one seed). Tokens to ref's "
        "loss: the tokens the "
        "arm's validation curve needs to reach the reference's final loss under the same "
        f"seed, interpolated between evaluations (mean over seeds; in brackets the fraction "
        f"of the run's {total / 1e6:.3g} M tokens).",
        "",
        "### At the shared learning rate",
        "",
        *_comparison_md(study, tables["shared"], total),
    ]
    if tables.get("grid"):
        chosen = list(seeds[: controls.select_seeds])
        lrs = sorted({k for row in tables["grid"] for k in row if k[0].isdigit()}, key=float)
        md += [
            "",
            f"### Learning-rate grid: selection-half loss, seeds {chosen}",
            "",
            "| arm | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best |",
            "|---" * (len(lrs) + 2) + "|",
        ]
        for row in tables["grid"]:
            cells = [
                f"{row[lr]:.4f}"
                if lr in row and math.isfinite(row[lr])
                else "diverged"
                if lr in row
                else "-"
                for lr in lrs
            ]
            edge = " (edge of the grid)" if row["edge"] else ""
            md.append(f"| {row['arm']} | " + " | ".join(cells) + f" | {row['best_lr']:g}{edge} |")
    if tables.get("best"):
        md += [
            "",
            "### Each arm at its best learning rate",
            "",
            *_comparison_md(study, tables["best"], total),
        ]
    elif controls.lrs:
        md += ["", "(The best-lr runs of the other seeds are not all finished.)"]
    (out / "table.md").write_text("\n".join(md) + "\n")


def _last_step(workdir: pathlib.Path) -> int:
    records = mx.read_jsonl(workdir / mx.JSONL) if (workdir / mx.JSONL).exists() else []
    return max((r["step"] for r in records), default=1)


def _plot(study: Study, out: pathlib.Path, runs: dict, seeds: Sequence[int]) -> None:
    """Training loss, report-half validation loss and PPL at the shared lr: the
    mean over seeds and the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train", "training loss", False),
        ("val", "validation loss (report half)", False),
        ("val", "validation PPL (report half)", True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title, ppl) in zip(axes, panels, strict=True):
        for arm in study.arms:
            res = [r for (label, _, s), r in runs.items() if label == arm.label and s in seeds]
            if not res:
                continue
            curves = [
                (r.train_steps, r.train_loss) if key == "train" else (r.val_steps, r.val_report)
                for r in res
            ]
            n = min(len(y) for _, y in curves)
            ys = np.stack([y[:n] for _, y in curves])
            ys = np.exp(ys) if ppl else ys
            marker = "o" if n <= 40 else None  # a curve of one evaluation is a point
            (line,) = ax.plot(
                curves[0][0][:n], ys.mean(0), label=arm.label, marker=marker, markersize=4
            )
            ax.fill_between(
                curves[0][0][:n], ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(
        f"{study.title} ({study.paper}); shared lr, mean and min-max over {len(seeds)} seeds"
    )
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
