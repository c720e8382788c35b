"""Run a study of the paper by name and write its table and plots.

    python launch.py --experiment NAME [--size cpu] [--seeds 0,1,2] [--workdir DIR]

NAME: order, order_polynorm, composition, relu_variants, activations, moe (training
studies), scaling (the scaling ladder, experiments/ladder.py: ``--size`` a list of its
rungs, default all; ``--lrs`` the first rung's grid), analysis (effective rank and
layer similarity of the activations and MoE studies' checkpoints, against their
initialisations), probes (the init-scale and MoE-gate measurements behind
experiments/README.md) or theory (Lemma 1 and approximation rates; no LLM training).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from experiments import analysis, ladder, probes, study, theory
from experiments.studies import STUDIES

NAMES = (*STUDIES, "scaling", "analysis", "probes", "theory")


def run(
    name: str,
    *,
    out: str | None = None,
    size: str | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    controls: study.Controls | None = None,
) -> None:
    """Run study ``name`` at config size ``size`` (default cpu; scaling: a comma list
    of rungs, default all) into ``out`` (default runs/experiments/<name>); ``extra``
    (field -> value) applies to every run; ``controls``: the lr grid, full evaluation
    and downstream tasks (``study.Controls``)."""
    controls = controls or study.Controls()
    if name not in NAMES:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(NAMES)}")
    out = out or f"runs/experiments/{name}"
    if name == "scaling":
        if controls.tasks:
            raise ValueError("--tasks: the scaling ladder scores no downstream tasks")
        ladder.run(
            out,
            rungs=ladder.rungs_of(size),
            seeds=seeds,
            extra=extra,
            controls=ladder.LadderControls(first=controls.lrs),
        )
        print((pathlib.Path(out) / "table.md").read_text())
        print(f"wrote {out}/table.md, table.csv, scaling.png")
        return
    size = size or "cpu"
    if name == "theory":
        theory.main(["--out", out, "--seeds", str(max(len(seeds), 2))])
    elif name == "probes":
        probes.main(out, size=size, seeds=seeds, extra=extra)
    elif name == "analysis":
        analysis.main(out, size=size, seeds=seeds, extra=extra, controls=controls)
    else:
        study.run(STUDIES[name], out, size=size, seeds=seeds, extra=extra, controls=controls)
        print((pathlib.Path(out) / "table.md").read_text())
        print(f"wrote {out}/table.md, table.csv, curves.png")
