"""Downstream scores of a study's final checkpoints: lm-evaluation-harness tasks
through ``polyjax.lm_eval_model`` (``pip install -e ".[eval]"``).

    python launch.py --experiment activations --tasks shakespeare_next_line,shakespeare_word_order
    python launch.py --experiment activations --tasks paper   # where the datasets are present

Each task is scored on its own, so that a task whose dataset cannot be loaded (no
hub, no local copy) is recorded as missing, with the reason, and the others still
count. Scores are kept in ``<run>/downstream.json`` and not recomputed. Unless the
environment says otherwise, the Hugging Face hub is not contacted
(``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``): a dataset is present when it is
in the local cache; set both to 0 to let the harness download.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

SCORES = "downstream.json"
METRICS = ("acc", "acc_norm")


def expand(tasks: Sequence[str]) -> list[str]:
    """Task names with "paper" replaced by the paper's task list (lm-eval names)."""
    out: list[str] = []
    for name in tasks:
        if name == "paper":
            from polyjax.lm_eval_model import PAPER_TASKS  # the optional [eval] extra

            out += [t for t in PAPER_TASKS if t not in out]
        elif name not in out:
            out.append(name)
    return out


def score(
    workdir: str | pathlib.Path,
    tasks: Sequence[str],
    batch_size: int = 32,
    limit: int | None = None,
) -> dict:
    """{task: {"acc": .., "acc_norm": ..} or {"missing": reason}} for the newest
    checkpoint of ``workdir``, each task scored once (cached in its SCORES file);
    ``limit``: examples per task (smoke tests)."""
    workdir = pathlib.Path(workdir)
    path = workdir / SCORES
    found = json.loads(path.read_text()) if path.exists() else {}
    todo = [t for t in expand(tasks) if t not in found]
    if not todo:
        return found
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from polyjax import lm_eval_model  # the optional [eval] extra
    except ImportError as e:
        raise ValueError(f"--tasks needs lm-eval ({e}): pip install -e '.[eval]'") from None
    lm = lm_eval_model.PolyjaxLM(workdir=str(workdir), batch_size=batch_size)
    for task in todo:
        try:
            results = lm_eval_model.main(
                str(workdir),
                [task],
                batch_size=batch_size,
                out_dir=str(workdir / "eval" / task),
                lm=lm,
                limit=limit,
            )
            values = results["results"][task]
            found[task] = {m: float(values[f"{m},none"]) for m in METRICS if f"{m},none" in values}
        except Exception as e:  # a dataset that cannot be loaded here, most often
            found[task] = {"missing": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        path.write_text(json.dumps(found, indent=2))
    return found


def summarize(per_seed: Sequence[dict], task: str, metric: str = "acc") -> str:
    """A table cell: mean ± std over seeds of ``metric``, or why it is missing."""
    values = [s.get(task, {}).get(metric) for s in per_seed]
    if any(v is None for v in values):
        why = next(
            (s.get(task, {}).get("missing") for s in per_seed if s.get(task, {}).get("missing")), ""
        )
        return "no data" if why else "not scored"
    arr = np.asarray(values, float)
    sd = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{arr.mean():.3f} ± {sd:.3f}"
