"""Where the numbers go: TensorBoard, ``metrics.jsonl``, a progress line, a
summary and a PNG of the loss curves (only the primary process writes); and the
throughput and MFU arithmetic.

Paths are ``epath`` paths, so a workdir may be a bucket (``gs://...``): there, files
cannot be appended to, so ``metrics.jsonl`` and the TensorBoard event file are
rewritten whole at each write (each flush)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np
from etils import epath

from polyjax import chips
from polyjax import workdir as wd

JSONL = "metrics.jsonl"
PLOT = "loss.png"


def peak_flops(device_kind: str, configured: float = 0.0) -> float | None:
    """``configured`` if set, else the bf16 peak of ``device_kind`` (``polyjax.chips``;
    None: unknown, for example a CPU, and then no MFU is reported)."""
    if configured > 0:
        return configured
    chip = chips.by_kind(device_kind)
    return None if chip is None else chip.peak_flops


class Throughput:
    """Tokens/s and MFU of the steps between two calls of ``measure``, leaving out
    the time spent in ``paused()`` blocks (evaluation). The clock starts at
    ``start`` (after the first step, which compiles). ``peak``: the peak FLOP/s of
    all the devices together (None: no MFU)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float | None):
        self.tokens, self.flops, self.peak = tokens_per_step, flops_per_step, peak
        self.time: float | None = None
        self.step, self.paused_s = 0, 0.0
        self.timed_steps, self.timed_s = 0, 0.0  # every measured interval, summed

    def start(self, step: int) -> None:
        self.time, self.step, self.paused_s = time.perf_counter(), step, 0.0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def measure(self, step: int) -> dict[str, float]:
        """``tokens_per_s`` (and ``mfu``) since the last call; {} before ``start``."""
        if self.time is None or step <= self.step:
            return {}
        now = time.perf_counter()
        seconds = now - self.time - self.paused_s
        rate = (step - self.step) * self.tokens / seconds
        self.timed_steps, self.timed_s = self.timed_steps + step - self.step, self.timed_s + seconds
        self.time, self.step, self.paused_s = now, step, 0.0
        return self._rates(rate, "")

    def mean(self) -> dict[str, float]:
        """``tokens_per_s_mean`` (and ``mfu_mean``) over every interval measured so far:
        their tokens over their time (the same clock as ``measure``: from the end of the
        first step, evaluation left out), with ``timed_steps``; {} before any."""
        if not self.timed_steps:
            return {}
        rate = self.timed_steps * self.tokens / self.timed_s
        return {**self._rates(rate, "_mean"), "timed_steps": self.timed_steps}

    def _rates(self, rate: float, suffix: str) -> dict[str, float]:
        out = {f"tokens_per_s{suffix}": rate}
        if self.peak:
            out[f"mfu{suffix}"] = rate / self.tokens * self.flops / self.peak
        return out


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        arr = np.asarray(value)
        if arr.ndim == 0 and np.issubdtype(arr.dtype, np.number):
            out[key] = float(arr)
    return out


class _RemoteEvents:
    """A TensorBoard event file on a bucket (through epath): rewritten whole at each
    flush (tensorboardX flushes every two minutes and at the end)."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _RemoteEventsFactory:
    def open(self, path: str) -> _RemoteEvents:
        return _RemoteEvents(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(logdir: epath.Path, purge_step: int):
    from tensorboardX import SummaryWriter, record_writer

    for scheme in ("gs", "s3", "az"):
        record_writer.register_writer_factory(scheme, _RemoteEventsFactory())
    return SummaryWriter(os.fspath(logdir), purge_step=purge_step)


class Writer:
    """Appends one record per call to TensorBoard and to ``workdir/metrics.jsonl``.

    Scalars go to TensorBoard as scalars; ``expert_load`` (layers x experts) as one
    histogram and a per-layer imbalance (max load x number of experts).
    On resume, records past the restored step are dropped from the JSONL.
    ``progress``: updated with each record. ``active=False`` (processes other than
    the primary): writes nothing.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        resume_step: int = 0,
        progress: Progress | None = None,
        active: bool = True,
    ):
        self.active, self.progress = active, progress
        if not active:
            return
        self.workdir = wd.path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / JSONL
        kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
        self.lines = [json.dumps(r) + "\n" for r in kept]
        self.path.write_text("".join(self.lines))
        self.file = None if wd.is_remote(self.workdir) else self.path.open("a")
        self.tb = _summary_writer(self.workdir / "tensorboard", resume_step + 1)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        for key, value in record.items():
            row[key] = np.asarray(value).tolist()
        if self.file is None:  # a bucket: no appending
            self.lines.append(json.dumps(row) + "\n")
            self.path.write_text("".join(self.lines))
        else:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        scalars = _scalars(record)
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.progress:
            extra = f"  val {scalars['val_loss']:.4f}" if "val_loss" in scalars else ""
            self.progress.update(step, scalars["loss"], scalars.get("tokens_per_s", 0), extra)
        if "expert_load" in record:
            load = np.asarray(record["expert_load"])
            self.tb.add_histogram("moe/expert_load", load, step)
            for layer, row_load in enumerate(load):
                self.tb.add_scalar(
                    f"moe/imbalance/layer{layer}", float(row_load.max() * load.shape[1]), step
                )

    def close(self) -> None:
        if self.active and self.tb is not None:
            if self.file is not None:
                self.file.close()
            self.tb.close()
            self.tb = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, in order ([] when there is none)."""
    path = epath.Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """A progress line: rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None):
        self.total, self.start_step = total_steps, start_step
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.width = 0

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else math.nan
        line = (
            f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
            f"elapsed {_duration(elapsed)}  eta {_duration(eta)}{extra}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line without breaking the progress line."""
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def plot_losses(
    records: list[dict], path: str | os.PathLike, baseline: float | None = None
) -> None:
    """Train and validation loss against the step, as a PNG; ``baseline`` (the
    unigram loss) as a dashed line."""
    plot_runs({"": records}, path, baseline)


def plot_runs(
    runs: Mapping[str, list[dict]], path: str | os.PathLike, baseline: float | None = None
) -> None:
    """Each run's train (line) and validation (dashed, a marker per evaluation) loss
    against the step, one colour per run (label: its key), as a PNG; ``baseline`` as a
    dashed grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, records) in enumerate(runs.items()):
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            style = {"marker": "o", "linestyle": "--" if name else "-"} if key == "val_loss" else {}
            if name:  # several runs: a colour each
                style["color"] = f"C{i % 10}"
            ax.plot(steps, values, label=f"{name} {label}".strip(), **style)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small" if len(runs) > 2 else None)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    epath.Path(path).write_bytes(png.getvalue())


MEAN_KEYS = ("tokens_per_s_mean", "mfu_mean", "timed_steps")


def finish(
    workdir: str | os.PathLike,
    unigram: float,
    progress: Progress,
    throughput: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """After a run: the loss plot, and the summary printed and written to
    ``summary.json``; returns the final record (the last logged values, and
    ``throughput``: ``Throughput.mean()`` of this launch, or the previous summary's
    when this launch trained no step)."""
    workdir = wd.path(workdir)
    records = read_jsonl(workdir / JSONL)
    plot_losses(records, workdir / PLOT, baseline=unigram)
    path = workdir / "summary.json"
    if not throughput and path.exists():
        throughput = {k: v for k, v in json.loads(path.read_text()).items() if k in MEAN_KEYS}
    final = {**(throughput or {}), "unigram_loss": unigram, "workdir": str(workdir)}
    progress.message("summary:\n" + summary(records, final))
    record = {**(records[-1] if records else {}), **final}
    path.write_text(json.dumps(record, indent=2))
    return record


def summary(records: list[dict], extra: Mapping[str, Any]) -> str:
    """A few lines: the final train/val loss, perplexity, speed (the last logging
    interval's, and the mean in ``extra``) and the rest of ``extra``."""
    last = {}
    for r in records:
        last.update(r)
    last.update(extra)
    rows = [("steps", last.get("step"))]
    shown = ("loss", "val_loss", "val_ppl", "tokens_per_s", "tokens_per_s_mean", "mfu", "mfu_mean")
    for key in shown:
        if key in last:
            rows.append((key, last[key]))
    rows += [(k, v) for k, v in extra.items() if k not in shown]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(f"  {k.ljust(width)}  {fmt(v)}" for k, v in rows)


def _last(records: list[dict], key: str) -> Any:
    return next((r[key] for r in reversed(records) if key in r), None)


SWEEP = "sweep"  # sweep.md, sweep.csv, sweep.png in a sweep's root
SWEEP_COLUMNS = ("point", "steps", "train_loss", "val_loss", "tokens_per_s_mean")


def write_sweep(root: str | os.PathLike, points: Mapping[str, str | os.PathLike]) -> list[dict]:
    """Compare a sweep's points (label -> workdir) in ``root``: ``sweep.md`` and
    ``sweep.csv`` (each point's last step, final train and validation loss from its
    metrics.jsonl, mean tokens/s from its summary.json) and ``sweep.png`` (their
    curves, ``plot_runs``). A point with nothing logged gets empty cells. Returns the rows."""
    root, rows, curves = wd.path(root), [], {}
    for label, workdir in points.items():
        workdir = wd.path(workdir)
        records = read_jsonl(workdir / JSONL)
        done = workdir / "summary.json"
        final = json.loads(done.read_text()) if done.exists() else {}
        rows.append(
            {
                "point": label,
                "steps": _last(records, "step"),
                "train_loss": _last(records, "loss"),
                "val_loss": _last(records, "val_loss"),
                "tokens_per_s_mean": final.get("tokens_per_s_mean"),
            }
        )
        curves[label] = records
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (root / f"{SWEEP}.csv").write_text(buf.getvalue())
    cell = lambda v, f: "-" if v is None else format(v, f)
    md = [
        "| point | steps | train loss | val loss | tokens/s (mean) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['point']} | {cell(r['steps'], 'd')} | {cell(r['train_loss'], '.4f')} | "
            f"{cell(r['val_loss'], '.4f')} | {cell(r['tokens_per_s_mean'], ',.0f')} |"
            for r in rows
        ),
        "",
        "Losses (nats/token) at each point's last logged step (train: the mean since the "
        "log before); tokens/s: the mean over its timed steps (summary.json).",
    ]
    (root / f"{SWEEP}.md").write_text("\n".join(md) + "\n")
    plot_runs(curves, root / f"{SWEEP}.png")
    return rows
