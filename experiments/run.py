"""Run a study of the paper by name and write its table and plots.

    python launch.py --experiment NAME [--size cpu] [--seeds 0,1,2] [--workdir DIR]

NAME: order, composition, relu_variants, activations, moe (training studies),
analysis (effective rank and layer similarity of the activations and MoE studies'
checkpoints, against their initialisations), probes (the init-scale and MoE-gate
measurements behind experiments/README.md) or theory (Lemma 1 and approximation
rates; no LLM training).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from experiments import analysis, probes, study, theory
from experiments.studies import STUDIES

NAMES = (*STUDIES, "analysis", "probes", "theory")


def run(
    name: str,
    *,
    out: str | None = None,
    size: str = "cpu",
    seeds: Sequence[int] = (0, 1, 2),
    extra: Mapping[str, Any] = MappingProxyType({}),
    controls: study.Controls | None = None,
) -> None:
    """Run study ``name`` at config size ``size`` into ``out`` (default
    runs/experiments/<name>); ``extra`` (field -> value) applies to every run;
    ``controls``: the lr grid, full evaluation and downstream tasks (``study.Controls``)."""
    controls = controls or study.Controls()
    if name not in NAMES:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(NAMES)}")
    out = out or f"runs/experiments/{name}"
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
