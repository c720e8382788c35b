"""launch.py: overrides, sweeps, dry run, and one-line errors before any compile."""

import importlib.util
import pathlib

import numpy as np
import pytest

from polyjax import checkpoint as ckpt
from polyjax import config as pc
from polyjax import metrics as mx
from polyjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch", ROOT / "launch.py")
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

TINY = [
    f"--config={ROOT}/configs/dense.py:size=tiny",
    "--config.train.steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_batches=1",
    "--config.data.seq_len=16",
    "--config.data.global_batch=8",
]


def one_line_error(capsys, argv, *fragments):
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("launch.py: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_misspelt_override_names_close_matches(capsys):
    one_line_error(capsys, [*TINY, "--config.optim.lrr=1e-3"], "'optim.lrr'", "optim.lr")


def test_override_of_wrong_type(capsys):
    one_line_error(capsys, [*TINY, "--config.train.steps=many"], "train.steps", "int")


def test_unknown_activation(capsys):
    one_line_error(
        capsys, [*TINY, "--config.model.activation.name=polynrom"], "polynrom", "polynorm"
    )


def test_impossible_mesh(capsys):
    one_line_error(capsys, [*TINY, "--config.mesh.data=3"], "mesh")


def test_bad_config_argument(capsys):
    one_line_error(capsys, [f"--config={ROOT}/configs/dense.py:activation=relu"], "act", "size")


def test_dry_run_prints_counts_mesh_and_plan(capsys):
    assert launch.main([*TINY, "--dry_run"]) == 0
    out = capsys.readouterr().out
    for fragment in ("parameters: total", "active", "mesh", "sharding plan", "P("):
        assert fragment in out


def test_override_and_sweep(tmp_path, capsys):
    argv = [*TINY, f"--workdir={tmp_path}", "--sweep", "model.activation.order=1,2"]
    assert launch.main([*argv, "--config.optim.lr=0.01"]) == 0
    for order in (1, 2):
        run = tmp_path / f"model.activation.order={order}"
        saved = (run / "config.json").read_text()
        assert f'"order": {order}' in saved and '"lr": 0.01' in saved
        assert [r["step"] for r in mx.read_jsonl(run / mx.JSONL)] == [1, 2]


def test_incompatible_workdir_is_refused_untouched(tmp_path, capsys):
    cfg = pc.load(TINY[0].partition("=")[2])
    for flag in TINY[1:]:
        pc.override(cfg, *flag.removeprefix("--config.").split("="))
    saver = ckpt.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    saver.save(1, {"w": np.zeros(2)}, {}, train.Spec.from_config(cfg).config)
    saver.close()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    one_line_error(
        capsys,
        [*TINY, f"--workdir={tmp_path}", "--config.model.d_ff=48"],
        "incompatible",
        "model.d_ff",
    )
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_override_parsing():
    cfg = pc.load(f"{ROOT}/configs/dense.py:size=tiny")
    pc.override(cfg, "train.async_checkpoint", "false")
    pc.override(cfg, "optim.lr", "2")
    pc.override(cfg, "optim.mu_dtype", "bfloat16")
    assert cfg.train.async_checkpoint is False and cfg.optim.lr == 2.0
    assert cfg.optim.mu_dtype == "bfloat16"
    with pytest.raises(ValueError, match="section"):
        pc.override(cfg, "optim", "1")
    with pytest.raises(ValueError, match=r"did you mean train\.steps"):
        pc.override(cfg, "train.stpes", "1")


def test_distributed_flags_go_together(capsys):
    one_line_error(capsys, [*TINY, "--num_processes=2"], "--coordinator")
