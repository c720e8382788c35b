"""launch.py: overrides, sweeps, dry run, and one-line errors before any compile."""

import csv
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import launch
from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax.model import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = {"train.steps": 2}


def test_misspelt_override_names_close_matches(launch_py, tiny):
    launch_py(*tiny.argv(**RUN), "--config.optim.lrr=1e-3").error("'optim.lrr'", "optim.lr")


def test_override_of_wrong_type(launch_py, tiny):
    launch_py(*tiny.argv(**RUN), "--config.train.steps=many").error("train.steps", "int")


def test_unknown_activation(launch_py, tiny):
    result = launch_py(*tiny.argv(**RUN), "--config.model.activation.name=polynrom")
    result.error("polynrom", "polynorm")


def test_impossible_mesh(launch_py, tiny):
    launch_py(*tiny.argv(**RUN), "--config.mesh.data=3").error("mesh")


def test_bad_config_argument(launch_py):
    launch_py(f"--config={ROOT}/configs/dense.py:activation=relu").error("act", "size")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--dryrun"], ["'dryrun'", "dry_run"]),  # absl's own did-you-mean
        (["--config=nowhere/nothing.py"], ["--config", "nowhere/nothing.py"]),
        (["extra"], ["unexpected argument 'extra'"]),
        (["--sweep=model.activation.order"], ["--sweep", "field=v1,v2"]),
        (["--experiment=nope"], ["unknown experiment 'nope'", "order"]),
        (["--experiment=order", "--dry_run"], ["--experiment", "--dry_run"]),
        (["--experiment=scaling", "--size=ladder9"], ["'ladder9' is not a size", "ladder3"]),
        (["--experiment=scaling", "--tasks=paper"], ["--tasks", "scaling"]),
        (["--config.optim=1"], ["config.optim"]),
    ],
)
def test_bad_flags_are_one_line(launch_py, args, fragments):
    launch_py(*args).error(*fragments)


def test_dry_run_prints_counts_and_the_plan_of_every_parameter(launch_py, tiny, tmp_path):
    argv = [*tiny.argv(**RUN), f"--workdir={tmp_path / 'run'}", "--dry_run"]
    result = launch_py(*argv, "--device_memory_gb=80")
    assert result.code == 0, result.err
    memory = result.out.split("memory per device")[1]
    for row in ("parameters", "optimizer state", "temporaries", "total"):
        assert f"  {row} " in memory
    assert "(given): fits" in memory  # a tiny model in 80 GB
    assert "data: shakespeare: " in result.out
    model = Transformer(tiny.spec().model, rngs=nnx.Rngs(0))  # allocated: counted for real
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    total = sum(int(np.prod(v.get_value().shape)) for _, v in params)
    assert f"parameters: total {total:,}" in result.out
    plan = result.out.split("sharding plan")[1].splitlines()[2:]  # after the mesh line
    for path, var in params:
        name = "/".join(map(str, path))
        line = next(row for row in plan if row.split()[0] == name)
        assert str(tuple(var.get_value().shape)) in line and "-> P(" in line
    assert f"workdir {tmp_path / 'run'}" in result.out
    assert not (tmp_path / "run").exists()  # nothing written


def test_override_and_sweep(tmp_path, launch_py, tiny):
    """Each point runs with the override; the sweep's root gets a table of the points
    (from their metrics.jsonl and summary.json) and their curves, again when the
    sweep is launched once more with every point done."""
    argv = [*tiny.argv(**RUN), f"--workdir={tmp_path}", "--sweep", "model.activation.order=1,2"]
    result = launch_py(*argv, "--config.optim.lr=0.01")
    assert result.code == 0, result.err
    expected = []
    for order in (1, 2):
        run = tmp_path / f"model.activation.order={order}"
        saved = (run / "config.json").read_text()
        assert f'"order": {order}' in saved and '"lr": 0.01' in saved
        records = mx.read_jsonl(run / mx.JSONL)
        assert [r["step"] for r in records] == [1, 2]
        summary = json.loads((run / "summary.json").read_text())
        values = (records[-1]["loss"], records[-1]["val_loss"], summary["tokens_per_s_mean"])
        expected.append([f"model.activation.order={order}", "2", *map(str, values)])
    table = (tmp_path / "sweep.csv").read_text()
    assert list(csv.reader(io.StringIO(table))) == [list(mx.SWEEP_COLUMNS), *expected]
    md = (tmp_path / "sweep.md").read_text()
    assert f"| model.activation.order=2 | 2 | {float(expected[1][2]):.4f} |" in md
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        (tmp_path / name).unlink()
    again = launch_py(*argv, "--config.optim.lr=0.01")  # every point done: none trains
    assert again.code == 0 and "sweep: " in again.out, again.err
    assert (tmp_path / "sweep.csv").read_text() == table


def test_overrides_are_typed_by_the_field(launch_py, tiny):
    """config_flags parses each value to its field's type, None-valued fields
    (typed placeholders) included."""
    overrides = [
        "--config.train.async_checkpoint=false",
        "--config.optim.lr=2",
        "--config.optim.mu_dtype=bfloat16",
        "--config.model.n_kv_heads=2",
    ]
    result = launch_py(*tiny.argv(**RUN), *overrides, "--dry_run", "--nomemory_plan")
    assert result.code == 0, result.err
    assert "memory per device" not in result.out
    cfg = launch.CONFIG.value
    assert cfg.train.async_checkpoint is False and cfg.optim.lr == 2.0
    assert isinstance(cfg.optim.lr, float) and cfg.optim.mu_dtype == "bfloat16"
    assert cfg.model.n_kv_heads == 2 and cfg.to_dict()["model"]["n_kv_heads"] == 2
    launch_py(*tiny.argv(**RUN), "--config.train.stpes=1").error("did you mean train.steps")


def test_incompatible_workdir_is_refused_untouched(tmp_path, launch_py, tiny):
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    saver.save(1, {"w": np.zeros(2)}, {}, tiny.spec(**RUN).config)
    saver.close()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = launch_py(*tiny.argv(**RUN), f"--workdir={tmp_path}", "--config.model.d_ff=48")
    result.error("incompatible", "model.d_ff")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_distributed_flags_go_together(launch_py, tiny):
    launch_py(*tiny.argv(**RUN), "--num_processes=2").error("--coordinator")


def test_parsing_again_forgets_the_last_overrides(launch_py, tiny):
    """absl's flags are global: a second command line starts from scratch."""
    dry = ("--dry_run", "--nomemory_plan")
    assert launch_py(*tiny.argv(**RUN), "--config.optim.lr=0.5", *dry).code == 0
    assert launch_py(*tiny.argv(**RUN), *dry).code == 0
    assert launch.CONFIG.value.optim.lr == tiny.config(**RUN).optim.lr != 0.5
    assert "config.optim.lr" not in launch.FLAGS
    assert jax.device_count() == 8  # no process group was started


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_1b_configs_name_a_token_store_to_fill_in(launch_py, family, tmp_path):
    """The 1B configs read a pre-tokenised store (placeholder paths): the dry run
    works without it and says so; a run stops in one line naming the pretokenize
    command, before anything is written."""
    config = f"--config={ROOT}/configs/{family}.py:size=1b"
    dry = launch_py(config, "--dry_run", "--nomemory_plan")
    assert dry.code == 0, dry.err
    assert "data: NOT READY" in dry.out and "python -m polyjax.data.pretokenize" in dry.out
    launch_py(config, f"--workdir={tmp_path / 'run'}").error(
        "/path/to/tokens is not a token store", "python -m polyjax.data.pretokenize"
    )
    assert not (tmp_path / "run").exists()
