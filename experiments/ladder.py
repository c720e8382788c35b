"""The scaling ladder: how PolyCom's margin over SwiGLU, and the order r of PolyReLU,
move with training compute.

    python launch.py --experiment scaling --seeds 0,1,2 --workdir experiments/results/scaling
    python launch.py --experiment scaling --size ladder0,ladder1 ...   # some rungs only

The rungs are sizes of ``configs/common.py`` (``LADDER``): the cpu size's shape grown
in width and depth together, on the ladder corpus (built on first use), the tokens
growing with the FLOPs per token. Arms: SwiGLU, PolyNorm, PolyReLU (r = 3) and
PolyReLU of order 1, 2 and 4. At each rung, each arm runs an lr grid on the first
seed, centred on its best lr of the rung below (``LadderControls.centre`` at the
first rung) times 1/f, 1, f; a best lr at an edge of the grid extends it by one more
lr past that edge, at most ``extend`` times. The best lr (selection half) then runs
on the other seeds; SwiGLU, PolyNorm and PolyReLU (``HEADLINE``) train first at each
rung, grids and seeds, then the orders. A rung's runs all finish before the next
rung's start, so the cheap rungs come first; after every run the tables and plots
are written again over the runs finished so far, so a ladder cut short is already
tabulated.

Runs live in the study pool (``_runs`` beside the workdir), keyed by config, so an
interrupted ladder continues where it stopped, and a ladder built over several
sessions finds its runs again. The workdir's ``corpus.json`` records the corpus its
runs trained on; a different one is refused.

Outputs: ``table.md`` / ``table.json`` / ``table.csv`` (per rung: every arm at its
best lr, Δ to SwiGLU and to r = 3 with 95% intervals; the fits; the verdict on
scale), ``scaling.png`` and ``runs.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from configs import common, dense
from experiments import corpus
from experiments import stats as st
from experiments import study as sd
from experiments.progress import StudyProgress, run_flops
from experiments.study import Arm, Run, Study
from polyjax import metrics as mx
from polyjax.data import store
from polyjax.model import ModelConfig, flops_per_token, param_counts

ORDER = "model.activation.order"
ARMS = (
    Arm("swiglu", "swiglu"),
    Arm("polynorm", "polynorm"),
    Arm("polyrelu", "polyrelu"),  # r = 3, the default order
    Arm("r=1", "polyrelu", overrides=((ORDER, 1),)),
    Arm("r=2", "polyrelu", overrides=((ORDER, 2),)),
    Arm("r=4", "polyrelu", overrides=((ORDER, 4),)),
)
BY_LABEL = {a.label: a for a in ARMS}
ORDERS = ("r=1", "r=2", "polyrelu", "r=4")
# Within a rung, these arms (Figure 1's comparison) train first, grids and seeds, then
# the orders: a rung cut short has its Δs to SwiGLU before its Δs to r = 3.
HEADLINE = ("swiglu", "polynorm", "polyrelu")


def references(labels: Sequence[str]) -> list[tuple[str, Study]]:
    """The comparisons of the arms ``labels``: ("swiglu", every arm against SwiGLU) and
    ("r3", the orders against PolyReLU r = 3), where the reference is among them."""
    arms = tuple(a for a in ARMS if a.label in labels)
    orders = tuple(BY_LABEL[k] for k in ORDERS if k in labels)
    out = []
    if "swiglu" in labels:
        out.append(("swiglu", Study("scaling", "Δ to SwiGLU", "Figure 1", arms, "swiglu")))
    if "polyrelu" in labels and len(orders) > 1:
        out.append(("r3", Study("scaling", "Δ to r = 3", "Figure 5a", orders, "polyrelu")))
    return out


VS_SWIGLU = references([a.label for a in ARMS])[0][1]  # what make_run names its configs by
PAPER_DELTA = -0.02  # PolyReLU and PolyNorm 2.17 vs SwiGLU 2.19 (Table 1), the 1B dense model


@dataclasses.dataclass(frozen=True)
class Rung:
    """A rung: a config size and its changes (field -> value) on top of it."""

    name: str
    size: str
    overrides: tuple[tuple[str, Any], ...] = ()


RUNGS = tuple(Rung(name, name) for name in common.LADDER)


def rungs_of(sizes: str | None) -> tuple[Rung, ...]:
    """``"ladder0,ladder2"`` -> those rungs (None: every rung of ``common.LADDER``).
    The lr walk starts at the first rung listed: a ladder built in parts lists its
    rungs from the bottom (``ladder0`` first, ``ladder0,ladder1`` next, ...)."""
    if not sizes:
        return RUNGS
    names = [s.strip() for s in sizes.split(",") if s.strip()]
    valid = list(dense.SIZES)
    for n in names:
        if n not in valid:
            raise ValueError(f"--size={sizes}: {n!r} is not a size; valid: {', '.join(valid)}")
    return tuple(Rung(n, n) for n in names)


@dataclasses.dataclass(frozen=True)
class LadderControls:
    """The lr grid of each arm at each rung: ``first`` at the first rung (default
    ``centre`` x (1/f, 1, f)), then the arm's best lr of the rung below x (1/f, 1, f)
    (``width`` lrs, odd: 1 is the centre alone, 5 adds 1/f^2 and f^2); a best lr at an
    edge adds ``best x f`` (or ``/ f``), at most ``extend`` times.
    ``select_seeds``: the grid's seeds (the first ones). ``arms``: labels of ARMS."""

    centre: float = 3e-3
    factor: float = 2.0
    extend: int = 2
    first: tuple[float, ...] = ()
    width: int = 3
    select_seeds: int = 1
    arms: tuple[str, ...] = tuple(a.label for a in ARMS)


def _lr(x: float) -> float:
    return float(f"{x:.6g}")


def make_run(rung: Rung, arm: Arm, seed: int, extra, root, lr: float | None) -> Run:
    r = sd.make_run(
        VS_SWIGLU,
        arm,
        rung.size,
        seed,
        {**dict(rung.overrides), **extra},
        sd.Controls(full_eval=False),
        root,
        lr,
    )
    return dataclasses.replace(r, rung=rung.name)


def _grid_of(rung, arm, centre, first, seeds, extra, root, controls, partial):
    """One arm's grid at one rung: (its runs on the selection ``seeds``, its best lr
    or None while the grid has not finished)."""
    f, half = controls.factor, controls.width // 2
    lrs = sorted({_lr(x) for x in (first or (centre * f**i for i in range(-half, half + 1)))})
    most = len(lrs) + controls.extend
    while True:
        runs = [make_run(rung, arm, s, extra, root, lr) for lr in lrs for s in seeds]
        done = [r for r in runs if sd.finished(r)]
        if len(done) < len(runs) and not partial:
            return runs, None
        grid = sd._grid(VS_SWIGLU, arm, {r.key: r for r in done}, seeds)
        if not grid:
            return runs, None
        best = st.best_lr(grid)
        if not st.at_edge(best, lrs) or len(lrs) >= most:
            return runs, best
        beyond = _lr(best * f if best == max(lrs) else best / f)
        ahead = [make_run(rung, arm, s, extra, root, beyond) for s in seeds]
        if partial and not all(sd.finished(r) for r in ahead):
            return runs, best
        lrs = sorted({*lrs, beyond})


def plan(
    rungs: Sequence[Rung],
    seeds: Sequence[int],
    extra: Mapping[str, Any],
    root: pathlib.Path,
    controls: LadderControls = LadderControls(),
    partial: bool = False,
) -> tuple[list[Run], list[Run], dict[tuple[str, str], float]]:
    """The ladder's runs as far as its finished runs determine them, rung by rung:
    every arm's grid on the selection seeds (extended past a best edge), then every
    arm's best lr on the other seeds, the HEADLINE arms' grids and seeds before the
    others'. Returns (the known runs in training order;
    stand-ins at the config's lr for the runs not known yet, for the ETA only; the
    best lr of each (rung, arm) known). ``partial``: the best lr over the grid's
    finished runs (a ladder cut short)."""
    chosen, others = seeds[: controls.select_seeds], seeds[controls.select_seeds :]
    arms = [BY_LABEL[label] for label in controls.arms]
    centre: dict[str, float | None] = {a.label: controls.centre for a in arms}
    known, forecast, best = [], [], {}
    for k, rung in enumerate(rungs):
        grids, then = {}, {}  # headline arm or not -> runs
        for a in arms:
            group = a.label in HEADLINE
            stand_in = lambda s, a=a, rung=rung: make_run(rung, a, s, extra, root, None)
            if centre[a.label] is None:  # the rung below has not chosen yet
                forecast += [stand_in(s) for s in chosen for _ in range(controls.width)]
                forecast += [stand_in(s) for s in others]
                continue
            first = controls.first if k == 0 else ()
            runs, b = _grid_of(
                rung, a, centre[a.label], first, chosen, extra, root, controls, partial
            )
            grids.setdefault(group, []).extend(runs)
            centre[a.label] = b
            if b is None:
                forecast += [stand_in(s) for s in others]
            else:
                best[(rung.name, a.label)] = b
                then.setdefault(group, []).extend(
                    make_run(rung, a, s, extra, root, b) for s in others
                )
        for group in (True, False):
            known += grids.get(group, []) + then.get(group, [])
    return known, forecast, best


# --- The corpus: built on first use, and the same for every run of a workdir. ------


def corpus_id(store_dir: pathlib.Path) -> dict:
    """What identifies a token store's content (not its path or build time): its
    tokenizer's fingerprint, its token count and its shards' sha256."""
    meta = json.loads((store_dir / "meta.json").read_text())
    tok = store.TokenStore(store_dir).tokenizer().fingerprint
    shards = hashlib.sha256("".join(s["sha256"] for s in meta["shards"]).encode()).hexdigest()
    return {"tokenizer": tok, "tokens": meta["num_tokens"], "shards_sha256": shards[:16]}


BUILD = [
    "--out", common.LADDER_CORPUS, "--vocab_size", "4096", "--roots", "interpreters",
    "--one_per_path", "--mb", "1000", "--workers", "2",
]  # fmt: skip


def check_corpus(rungs: Sequence[Rung], extra: Mapping[str, Any], out: pathlib.Path) -> None:
    """Build the ladder corpus if a rung reads it and it is missing (minutes, once);
    then the corpus of the workdir's runs (``corpus.json``) must be this one."""
    sources = {make_run(r, ARMS[0], 0, extra, out, None).cfg.data.source for r in rungs}
    stores = [pathlib.Path(s.partition(":")[2]) for s in sources if s.startswith("tokens:")]
    if not stores:
        return
    for path in stores:
        if (
            path == pathlib.Path(common.LADDER_CORPUS) / "tokens"
            and not (path / "meta.json").exists()
        ):
            print(f"building the ladder corpus: python -m experiments.corpus {' '.join(BUILD)}")
            corpus.main(BUILD)
    # a missing store other than the ladder's is the trainer's one-line error
    ids = {str(p): corpus_id(p) for p in stores if (p / "meta.json").exists()}
    record = out / "corpus.json"
    if record.exists():
        before = json.loads(record.read_text())
        for p, now in ids.items():
            if p in before and before[p] != now:
                raise ValueError(
                    f"{p} is not the corpus the runs of {out} trained on ({record}: "
                    f"{before[p]}, now {now}); rebuild it with `python -m experiments.corpus "
                    f"{' '.join(BUILD)}` from this machine's interpreters, or use another --workdir"
                )
        ids = {**before, **ids}
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(ids, indent=2))


# --- Running it. --------------------------------------------------------------------


def run(
    out: str | pathlib.Path,
    *,
    rungs: Sequence[Rung] = RUNGS,
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    controls: LadderControls = LadderControls(),
    runs_root: str | pathlib.Path | None = None,
    run_missing: bool = True,
    progress: StudyProgress | None = None,
) -> dict:
    """Train the ladder's runs not finished before (under ``runs_root``, default the
    ``_runs`` pool beside ``out``), writing the tables and plots into ``out`` after
    each; returns the tables (``report``). ``run_missing=False``: tabulate the
    finished runs only."""
    out = pathlib.Path(out)
    root = pathlib.Path(runs_root) if runs_root else out.parent / "_runs"
    check_corpus(rungs, extra, out)
    args = (rungs, seeds, extra, root, controls, not run_missing)
    out.mkdir(parents=True, exist_ok=True)

    def tabulate() -> dict:
        known, _, best = plan(*args)
        chosen = seeds[: controls.select_seeds]
        write_index(out, [r for r in known if sd.finished(r)], rungs, chosen)
        (out / "ladder.json").write_text(
            json.dumps(
                {
                    "command": command(out, rungs, seeds, extra, controls),
                    "controls": dataclasses.asdict(controls),
                    "pool": str(root),
                    # each (rung, arm)'s best lr, once its grid (extensions too) has finished
                    "best": {f"{rung}/{arm}": lr for (rung, arm), lr in best.items()},
                },
                indent=2,
            )
        )
        return report(out)

    sd.train_planned("scaling", lambda: plan(*args)[:2], run_missing, progress, after=tabulate)
    return tabulate()


def command(out, rungs, seeds, extra, controls) -> str:
    """The launch.py line that makes this ladder (``--config.*`` overrides included)."""
    parts = ["python launch.py --experiment scaling"]
    if tuple(rungs) != RUNGS:
        parts.append("--size " + ",".join(r.name for r in rungs))
    parts.append("--seeds " + ",".join(map(str, seeds)))
    if controls.first:
        parts.append("--lrs " + ",".join(f"{lr:g}" for lr in controls.first))
    parts += [f"--config.{k}={v}" for k, v in extra.items()]
    return " ".join([*parts, f"--workdir {out}"])


def write_index(
    out: pathlib.Path, runs: Sequence[Run], rungs: Sequence[Rung], chosen: Sequence[int]
) -> None:
    """``runs.json``: each finished run by key, with its rung, arm, lr, seed, workdir,
    whether it is a grid run (``chosen``: the grid's seeds), its parameters and its
    training FLOPs."""
    order = {r.name: i for i, r in enumerate(rungs)}
    index = {}
    for r in runs:
        index[r.key] = {
            "workdir": str(r.workdir),
            "rung": r.rung,
            "rung_index": order[r.rung],
            "arm": r.arm.label,
            "lr": r.lr,
            "seed": r.seed,
            "grid": r.seed in chosen,
            "tokens_per_step": sd._tokens_per_step(r.cfg),
            "steps": r.cfg.train.steps,
            "params": _params(r.cfg),
            "flops": run_flops(r.cfg),
            "shape": {
                "d_model": r.cfg.model.d_model,
                "n_layers": r.cfg.model.n_layers,
                "d_ff": r.cfg.model.d_ff,
                "vocab_size": r.cfg.model.vocab_size,
            },
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(index, indent=2))


@functools.cache
def _counts(model_json: str) -> dict:
    counts = param_counts(ModelConfig.from_dict(json.loads(model_json)))
    return {"total": counts["total"], "non_embedding": counts["total"] - counts["embedding"]}


def _params(cfg) -> dict:
    return _counts(json.dumps(cfg.model.to_dict(), sort_keys=True))


@functools.cache
def paper_compute() -> float:
    """Training FLOPs of the paper's 1B dense model (configs/dense.py size=1b):
    flops_per_token x its 250 B tokens."""
    cfg = dense.get_config("act=polynorm,size=1b")
    model = ModelConfig.from_dict(cfg.model.to_dict())
    tokens = cfg.train.steps * cfg.data.global_batch * cfg.data.seq_len
    return flops_per_token(model, cfg.data.seq_len) * tokens


@functools.cache
def size_compute(size: str) -> float:
    """Training FLOPs of one dense PolyNorm run of a config size."""
    return run_flops(dense.get_config(f"act=polynorm,size={size}"))


# --- The tables, the fits and the verdict. -------------------------------------------


def _seconds_per_step(res: sd.Result) -> float:
    """Training seconds per step, from the run's logged tokens/s (evaluation excluded)."""
    records = mx.read_jsonl(res.workdir / mx.JSONL)
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return res.tokens_per_step / float(np.median(speeds)) if speeds else math.nan


def report(out: str | pathlib.Path) -> dict:
    """The ladder's tables and plots from ``runs.json`` (its finished runs): per rung,
    every arm at its best lr with Δ to SwiGLU and to r = 3; per arm a straight line
    in log-log (loss against compute); per arm the Δs against log10 compute with the
    95% interval of their slope; the verdict on scale. An arm is compared at a rung
    once it has chosen its lr (``ladder.json``'s "best": its grid finished; without
    that record, the best of the grid runs finished) and every seed has finished there,
    so a rung's first arms are compared while its last ones train."""
    out = pathlib.Path(out)
    index = json.loads((out / "runs.json").read_text())
    made = json.loads((out / "ladder.json").read_text()) if (out / "ladder.json").exists() else {}
    decided = made.get("best")
    key = lambda e: (e["rung"], e["arm"], e["lr"], e["seed"])
    results = {
        key(e): sd.load_result(pathlib.Path(e["workdir"]), e["tokens_per_step"])
        for e in index.values()
    }
    meta = {key(e): e for e in index.values()}
    rungs = [n for _, n in sorted({(e["rung_index"], e["rung"]) for e in index.values()})]
    seeds = sorted({e["seed"] for e in index.values()})
    chosen = sorted({e["seed"] for e in index.values() if e["grid"]})
    labels = set(made.get("controls", {}).get("arms", ())) or {e["arm"] for e in index.values()}
    arms = [a for a in ARMS if a.label in labels]
    tables: dict[str, Any] = {"rungs": [], "grid": [], "swiglu": [], "r3": [], "fits": []}
    points: dict[str, dict[str, list]] = {}  # arm -> {"x": log10 C, "y": loss, "rung"} per seed
    deltas: dict[tuple[str, str], dict[str, list]] = {}  # (ref, arm) -> {"x", "y"} per seed
    for rung in rungs:
        best = {}
        for a in arms:
            lrs = sorted({k[2] for k in results if k[:2] == (rung, a.label)})
            grid = {
                lr: [results[(rung, a.label, lr, s)].final["select"] for s in chosen]
                for lr in lrs
                if all((rung, a.label, lr, s) in results for s in chosen)
            }
            if not grid:
                continue
            pick = st.best_lr(grid) if decided is None else decided.get(f"{rung}/{a.label}")
            if pick is not None:
                best[a.label] = pick
            tables["grid"].append(
                {
                    "rung": rung,
                    "arm": a.label,
                    "best_lr": pick,  # None: the grid is still running
                    "edge": pick is not None and st.at_edge(pick, list(grid)),
                    "losses": {f"{lr:g}": float(np.mean(v)) for lr, v in grid.items()},
                }
            )
        in_rung = [e for e in index.values() if e["rung"] == rung]
        first = in_rung[0]
        speeds = [_seconds_per_step(results[key(e)]) for e in in_rung]
        speed = float(np.median([v for v in speeds if math.isfinite(v)] or [math.nan]))
        tables["rungs"].append(
            {
                "rung": rung,
                **first["shape"],
                "d_ff": "/".join(
                    f"{v}" for v in sorted({e["shape"]["d_ff"] for e in in_rung})[::-1]
                ),
                "params": first["params"],
                "tokens": first["steps"] * first["tokens_per_step"],
                "steps": first["steps"],
                "flops": float(np.mean([e["flops"] for e in in_rung])),
                "runs": len(in_rung),
                "s_per_step": speed,
                "minutes": speed * first["steps"] / 60,
            }
        )
        # an arm joins its rung's comparisons once its lr is chosen and every seed has
        # finished at it; the rest of the rung (the orders, say) may still be training
        ready = [a for a in best if all((rung, a, best[a], s) in results for s in seeds)]
        res = {(a, s): results[(rung, a, best[a], s)] for a in ready for s in seeds}
        flops = {a: meta[(rung, a, best[a], seeds[0])]["flops"] for a in ready}
        for name, ref_study in references(labels):
            compared = tuple(a for a in ref_study.arms if a.label in ready)
            if ref_study.reference not in ready or len(compared) < 2:
                continue
            for row in sd._compare(dataclasses.replace(ref_study, arms=compared), res, seeds):
                row |= {
                    "rung": rung,
                    "lr": best[row["arm"]],
                    "flops": flops[row["arm"]],
                    "seed_list": seeds,
                }
                tables[name].append(row)
                if row["arm"] == ref_study.reference:
                    continue
                d = deltas.setdefault((ref_study.reference, row["arm"]), {"x": [], "y": []})
                for s in seeds:
                    own = res[(row["arm"], s)].final["report"]
                    d["x"].append(math.log10(flops[row["arm"]]))
                    d["y"].append(own - res[(ref_study.reference, s)].final["report"])
        for a in ready:
            p = points.setdefault(a, {"x": [], "y": [], "rung": []})
            for s in seeds:
                p["x"].append(math.log10(flops[a]))
                p["y"].append(res[(a, s)].final["report"])
                p["rung"].append(rung)
    c_paper = math.log10(paper_compute())
    for a, p in points.items():
        fit = st.line_fit(p["x"], np.log10(p["y"]))
        tables["fits"].append({"kind": "loss", "arm": a, **fit})
    for (ref, a), d in deltas.items():
        fit = st.line_fit(d["x"], d["y"])
        ok = math.isfinite(fit["slope"])
        at, low, high = st.line_at(fit, c_paper) if ok else (math.nan,) * 3
        pooled_low, pooled_high = st.mean_ci(d["y"])  # every run's Δ, as if no trend
        tables["fits"].append(
            {
                "kind": "delta",
                "ref": ref,
                "arm": a,
                **fit,
                "at_paper": at,
                "at_paper_low": low,
                "at_paper_high": high,
                "pooled": float(np.mean(d["y"])),
                "pooled_low": pooled_low,
                "pooled_high": pooled_high,
                "pooled_p": st.paired_t(d["y"])[1],
            }
        )
    tables["paper"] = {
        "flops": paper_compute(),
        "delta": PAPER_DELTA,
        "gpu_flops": size_compute("gpu"),
    }
    tables["verdict"] = verdicts(tables)
    _write(out, tables)
    _plot(out, tables, points, deltas)
    return tables


MIN_RUNGS = 3  # rungs a trend is fitted on


def _fit(tables: dict, kind: str, arm: str, ref: str | None = None) -> dict | None:
    for f in tables["fits"]:
        if f["kind"] == kind and f["arm"] == arm and f.get("ref") == ref:
            return f
    return None


def trend(tables: dict, arm: str, ref: str) -> str:
    """One sentence: does ``arm``'s Δ to ``ref`` shrink, hold or grow with compute,
    how sure (the 95% interval of the slope per decade), and where the line would be
    at the paper's compute; with fewer than MIN_RUNGS rungs, only the Δs."""
    name = "swiglu" if ref == "swiglu" else "r3"
    rows = [r for r in tables[name] if r["arm"] == arm]
    if not rows:
        return f"{arm} vs {ref}: no rung has finished."
    ends = f"Δ {rows[0]['delta']:+.3f} {_ci(rows[0])} at {rows[0]['flops']:.2g} FLOPs"
    if len(rows) > 1:
        ends += f" to {rows[-1]['delta']:+.3f} {_ci(rows[-1])} at {rows[-1]['flops']:.2g}"
    fit = _fit(tables, "delta", arm, ref)
    if len(rows) < MIN_RUNGS or fit is None or not math.isfinite(fit["slope_low"]):
        return f"{arm} vs {ref}: {ends}; too few rungs to fit a trend (need {MIN_RUNGS})."
    lo, hi, b = fit["slope_low"], fit["slope_high"], fit["slope"]
    mean = float(np.mean([r["delta"] for r in rows]))
    ahead = mean < 0
    toward_zero = (lo > 0) if ahead else (hi < 0)
    away = (hi < 0) if ahead else (lo > 0)
    gap = "margin" if ahead else "deficit"
    word = "shrinks" if toward_zero else "grows" if away else "holds (no trend shown)"
    sure = f"slope {b:+.3f} per decade of compute, 95% CI [{lo:+.3f}, {hi:+.3f}]"
    text = f"{arm} vs {ref}: {ends}; the {gap} {word}: {sure}, over {fit['n']} runs"
    lof = fit.get("lof_p", math.nan)
    if math.isfinite(lof):  # is a line the right summary of the rungs?
        text += (
            f"; the rungs depart from a line (lack-of-fit p {lof:.2g}): the change is not "
            "steady in log compute, so the slope summarises the rungs and predicts nothing"
            if lof < 0.05
            else f"; no departure from a line shown (lack-of-fit p {lof:.2f})"
        )
    if not (toward_zero or away) and not lof < 0.05:  # one Δ describes every rung
        text += (
            f"; pooled over the {fit['n']} runs, Δ {fit['pooled']:+.3f} "
            f"[{fit['pooled_low']:+.3f}, {fit['pooled_high']:+.3f}] "
            f"(p {sd._fmt_p(fit['pooled_p'])})"
        )
    if ref == "swiglu" and math.isfinite(fit.get("at_paper", math.nan)):
        paper = tables["paper"]
        decades = math.log10(paper["flops"]) - math.log10(max(r["flops"] for r in rows))
        inside = fit["at_paper_low"] <= paper["delta"] <= fit["at_paper_high"]
        text += (
            f". Extrapolated {decades:.1f} decades to the paper's {paper['flops']:.2g} FLOPs "
            f"the line gives {fit['at_paper']:+.3f} [{fit['at_paper_low']:+.3f}, "
            f"{fit['at_paper_high']:+.3f}]; the paper's {paper['delta']:+.2f} is "
            f"{'inside' if inside else 'outside'} that interval"
        )
        if not inside:  # the paper's setting differs (data, tokens per parameter)
            text += ", so if the settings compare, the line must bend above our top rung"
        if not (toward_zero or away):
            text += ". " + settle(tables, fit, rows)
    return text + ("" if text.endswith(".") else ".")


def settle(tables: dict, fit: dict, rows: list[dict]) -> str:
    """Where no trend is shown: what it would take to tell the slope that the paper's
    point implies (from our top rung's Δ to its Δ at its compute) from no slope. The
    interval must shrink by F; at the same spread per run, that is F^2 times the
    seeds, or a ladder F times as many decades long (its top rung at about
    C_top x 10^((F - 1) x our decades))."""
    paper = tables["paper"]
    top = max(rows, key=lambda r: r["flops"])
    span = math.log10(paper["flops"]) - math.log10(top["flops"])
    implied = (paper["delta"] - top["delta"]) / span
    half = (fit["slope_high"] - fit["slope_low"]) / 2
    if abs(implied) < 1e-4:
        return "Our top rung's Δ is the paper's already: no slope to tell from none."
    if abs(implied) >= half:
        return (
            f"The slope the paper's point implies ({implied:+.3f} per decade) is outside "
            f"the interval's half-width ({half:.3f}): this ladder can tell it from none."
        )
    factor = half / abs(implied)
    ours = math.log10(top["flops"]) - math.log10(min(r["flops"] for r in rows))
    needed = top["flops"] * 10 ** ((factor - 1) * ours)
    return (
        f"To tell the slope the paper's point implies ({implied:+.3f} per decade) from none, "
        f"the interval (±{half:.3f}) must shrink {factor:.1f}-fold: about {factor**2:.0f}x the "
        f"seeds at these rungs, or rungs up to ~{needed:.1g} FLOPs per run (the `gpu` size's "
        f"run is {paper['gpu_flops']:.2g})"
    )


def verdicts(tables: dict) -> list[str]:
    return [
        trend(tables, arm, ref)
        for arm, ref in (
            ("polyrelu", "swiglu"),
            ("polynorm", "swiglu"),
            ("r=1", "polyrelu"),
            ("r=2", "polyrelu"),
            ("r=4", "polyrelu"),
        )
        if any(r["arm"] == arm for r in tables["swiglu"] + tables["r3"])
        or arm in {g["arm"] for g in tables["grid"]}
    ]


def _ci(row: dict) -> str:
    if not math.isfinite(row.get("ci_low", math.nan)):
        return "(one seed)"
    return f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def _write(out: pathlib.Path, tables: dict) -> None:
    (out / "table.json").write_text(json.dumps(tables, indent=2, default=float))
    flat = [
        {"table": t, **{k: v for k, v in row.items() if k != "seed_list"}}
        for t in ("swiglu", "r3")
        for row in tables[t]
    ]
    buf = io.StringIO()
    if flat:
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        writer.writeheader()
        writer.writerows(flat)
    (out / "table.csv").write_text(buf.getvalue())
    made = out / "ladder.json"
    how = json.loads(made.read_text()).get("command") if made.exists() else None
    md = [
        "## The scaling ladder: activations and the order of PolyReLU against training compute",
        "",
        f"Made by `{how or '(not recorded)'}` (the runs finished so far; the same command "
        "continues it).",
        "",
        "Compute: training FLOPs = `flops_per_token` (6 x the matmul parameters but the input "
        "embedding, the head included, plus attention's 12 x layers x d_model x seq_len) x "
        "training tokens. Loss: the report half of the same held-out batches at every rung.",
        "",
        "### Rungs",
        "",
        "| rung | d_model | layers | FFN | params | non-embedding | steps | tokens | FLOPs "
        "| runs finished | s/step | min/run |",
        "|---" * 12 + "|",
    ]
    for r in tables["rungs"]:
        md.append(
            f"| {r['rung']} | {r['d_model']} | {r['n_layers']} | {r['d_ff']} | "
            f"{r['params']['total'] / 1e6:.2f} M | {r['params']['non_embedding'] / 1e6:.2f} M | "
            f"{r['steps']} | {r['tokens'] / 1e6:.2f} M | {r['flops']:.3g} | {r['runs']} | "
            f"{r['s_per_step']:.2f} | {r['minutes']:.1f} |"
        )
    md += [
        "",
        "s/step and min/run: the training steps of the rung's runs (median, from their "
        "logged tokens/s; evaluation and compile excluded), on the machine that ran them.",
        "",
    ]
    md += [
        "### Learning-rate grids (selection half, first seed)",
        "",
        "| rung | arm | grid (lr: loss) | best |",
        "|---|---|---|---|",
    ]
    for g in tables["grid"]:
        cells = ", ".join(f"{lr}: {v:.4f}" for lr, v in g["losses"].items())
        edge = " (edge)" if g["edge"] else ""
        pick = "running" if g["best_lr"] is None else f"{g['best_lr']:g}{edge}"
        md.append(f"| {g['rung']} | {g['arm']} | {cells} | {pick} |")
    for name, title in (("swiglu", "Δ to SwiGLU"), ("r3", "Δ to PolyReLU r = 3")):
        md += [
            "",
            f"### {title}, each arm at its best lr",
            "",
            "| rung | FLOPs | arm | lr | val loss | Δ | 95% CI of Δ | p | verdict |",
            "|---" * 9 + "|",
        ]
        for r in tables[name]:
            delta = "–" if r["verdict"] == "reference" else f"{r['delta']:+.4f}"
            md.append(
                f"| {r['rung']} | {r['flops']:.3g} | {r['arm']} | {r['lr']:g} | "
                f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {delta} | {sd._fmt_ci(r)} | "
                f"{sd._fmt_p(r['p'])} | {r['verdict']} |"
            )
    md += [
        "",
        "### Fits",
        "",
        "Loss: log10 L = a - b log10 C over every seed's point (L ∝ C^-b, no floor: with "
        "a few rungs a floor cannot be told from the slope). Δ: Δ = α + β log10 C over every "
        "seed's paired Δ; β's 95% t-interval from the residuals (n - 2 degrees of freedom). "
        f"Fitted from {MIN_RUNGS} rungs up. Line? : the p of the lack-of-fit F-test (do the "
        "rungs' means depart from the line by more than the seeds' spread explains; a small "
        "p says the line summarises the rungs but does not describe them). Pooled: the mean "
        "of every run's Δ with its 95% t-interval, the summary where no trend is shown.",
        "",
        "| fit | arm | slope | 95% CI | rungs | points | line? (p) | pooled Δ [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in tables["fits"]:
        what = "loss (b)" if f["kind"] == "loss" else f"Δ to {f['ref']} (β per decade)"
        slope = -f["slope"] if f["kind"] == "loss" else f["slope"]
        low, high = (
            (-f["slope_high"], -f["slope_low"])
            if f["kind"] == "loss"
            else (f["slope_low"], f["slope_high"])
        )
        if f["x_distinct"] < MIN_RUNGS:
            md.append(f"| {what} | {f['arm']} | – | – | {f['x_distinct']} | {f['n']} | – | – |")
            continue
        ci = f"[{low:+.4f}, {high:+.4f}]" if math.isfinite(low) else "-"
        lof = f.get("lof_p", math.nan)
        line = f"{lof:.2f}" if math.isfinite(lof) else "-"
        pooled = "–"
        if f["kind"] == "delta" and math.isfinite(f["pooled_low"]):
            pooled = f"{f['pooled']:+.4f} [{f['pooled_low']:+.4f}, {f['pooled_high']:+.4f}]"
        md.append(
            f"| {what} | {f['arm']} | {slope:+.4f} | {ci} | {f['x_distinct']} | {f['n']} "
            f"| {line} | {pooled} |"
        )
    md += ["", "### Verdict on scale", "", *[f"- {v}" for v in tables["verdict"]]]
    (out / "table.md").write_text("\n".join(md) + "\n")


def _plot(out: pathlib.Path, tables: dict, points: dict, deltas: dict) -> None:
    """Loss against compute (log-log, each seed's spread as error bars, the fitted
    lines); Δ to SwiGLU against compute with its 95% intervals and fitted lines, over
    the rungs and again extended to the paper's compute with its 1B point; Δ to r = 3
    over the rungs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    axes = axes.ravel()
    colors = {a.label: f"C{i}" for i, a in enumerate(ARMS)}
    ax = axes[0]
    for a, p in points.items():
        x, y = np.asarray(p["x"]), np.asarray(p["y"])
        xs = sorted(set(x.tolist()))
        mean = [y[x == v].mean() for v in xs]
        spread = [
            [y[x == v].mean() - y[x == v].min() for v in xs],
            [y[x == v].max() - y[x == v].mean() for v in xs],
        ]
        ax.errorbar(
            10.0 ** np.array(xs),
            mean,
            yerr=spread,
            marker="o",
            capsize=3,
            color=colors[a],
            label=a,
            linestyle="none",
        )
        fit = _fit(tables, "loss", a)
        if fit and fit["x_distinct"] >= MIN_RUNGS:
            grid = np.linspace(min(xs), max(xs), 20)
            ax.plot(
                10.0**grid,
                10.0 ** (fit["intercept"] + fit["slope"] * grid),
                color=colors[a],
                linestyle="--",
                linewidth=1,
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs",
        ylabel="validation loss (report half)",
        title="loss against compute: mean, min-max over seeds; dashed: L ∝ C^-b",
    )
    ax.legend(fontsize=8)
    paper = tables["paper"]
    panels = (  # axis, reference, title, the fits extended to the paper's compute?
        (axes[1], "swiglu", "Δ to SwiGLU", False),
        (axes[2], "swiglu", "Δ to SwiGLU", True),
        (axes[3], "polyrelu", "Δ to r = 3", False),
    )
    for ax, ref, title, to_paper in panels:
        name = "swiglu" if ref == "swiglu" else "r3"
        shown = [a.label for a in ARMS if a.label != ref]
        shown = [a for a in shown if any(r["arm"] == a for r in tables[name])]
        for i, a in enumerate(shown):
            rows = [r for r in tables[name] if r["arm"] == a]
            x = np.array([r["flops"] for r in rows])
            y = np.array([r["delta"] for r in rows])
            lo = np.array([r["ci_low"] for r in rows])
            hi = np.array([r["ci_high"] for r in rows])
            err = np.nan_to_num(np.stack([y - lo, hi - y]))
            jitter = 10 ** (0.012 * (i - (len(shown) - 1) / 2))  # side by side at a rung
            ax.errorbar(
                x * jitter,
                y,
                yerr=err,
                marker="o",
                capsize=3,
                color=colors[a],
                label=a,
                linestyle="none",
            )
            fit = _fit(tables, "delta", a, ref)
            if fit and fit["x_distinct"] >= MIN_RUNGS:
                end = math.log10(paper["flops"]) if to_paper else math.log10(x.max())
                grid = np.linspace(math.log10(x.min()), end, 50)
                band = np.array([st.line_at(fit, g) for g in grid])
                ax.plot(10.0**grid, band[:, 0], color=colors[a], linestyle="--", linewidth=1)
                ax.fill_between(10.0**grid, band[:, 1], band[:, 2], color=colors[a], alpha=0.1)
        ax.axhline(0, color="gray", linewidth=0.8)
        where = " to the paper's compute" if to_paper else ""
        if to_paper:
            ax.plot(
                [paper["flops"]],
                [paper["delta"]],
                marker="*",
                markersize=14,
                color="k",
                linestyle="none",
                label="paper, 1B (PolyReLU, PolyNorm)",
            )
        ax.set(
            xscale="log",
            xlabel="training FLOPs",
            ylabel=f"{title} (nats)",
            title=f"{title}{where}: mean, 95% CI over seeds; dashed: the fit",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes:  # log axes over few decades: minor ticks at 2 and 5 only, labelled
        lo, hi = ax.get_xlim()
        if hi / lo < 4:  # one rung: its arms' FLOPs differ by < 1%; show a decade around
            mid = math.sqrt(lo * hi)
            ax.set_xlim(mid / 3, mid * 3)
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.title.set_fontsize(10)
    axes[2].xaxis.set_minor_formatter(NullFormatter())  # nine decades: the majors will do
    axes[0].yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    axes[0].yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=90)
    plt.close(fig)
