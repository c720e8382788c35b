"""The trainer: loss, gradient accumulation, bitwise resume, two processes."""

import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from polyjax import config as pc
from polyjax import metrics as mx
from polyjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "train.steps": 6,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "train.checkpoint_every": 3,
    "data.seq_len": 16,
    "data.global_batch": 8,
    "optim.warmup_steps": 2,
}


def tiny_config(**overrides):
    cfg = pc.load(f"{ROOT}/configs/dense.py:size=tiny")
    for key, value in {**TINY, **overrides}.items():
        pc.override(cfg, key, str(value))
    return cfg


def losses(workdir):
    return [(r["step"], r["loss"]) for r in mx.read_jsonl(pathlib.Path(workdir) / mx.JSONL)]


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    weights = rng.integers(0, 2, (2, 3)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()
    got = train.cross_entropy_sum(logits, targets, weights)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    trainers = [
        train.Trainer(
            train.Spec.from_config(tiny_config(**{"optim.grad_accum": k, "data.global_batch": 16})),
            tmp_path / f"{k}",
        )
        for k in (1, 2)
    ]
    batch = train._global_batch(next(trainers[0].data_iter), trainers[0].batch_sharding)
    (s1, m1), (s2, m2) = (t.train_step(t.state, batch) for t in trainers)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    # Adam's first step is ~ lr * sign(g): tolerate a thousandth of a step where g ~ 0
    atol = 1e-3 * trainers[0].spec.optim.lr
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
    assert int(s1.step) == int(s2.step) == 1
    for t in trainers:
        t.checkpointer.close()


def test_loss_decreases_and_state_is_checkpointed(tmp_path):
    spec = train.Spec.from_config(tiny_config(**{"optim.lr": 3e-3}))
    out = train.train(spec, tmp_path)
    curve = [loss for _, loss in losses(tmp_path)]
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 7))
    assert curve[-1] < curve[0]
    assert out["val_ppl"] == pytest.approx(math.exp(out["val_loss"]))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert (tmp_path / mx.PLOT).stat().st_size > 0
    sched = train.optim.lr_schedule(spec.optim, spec.train.steps)
    logged = [r["lr"] for r in mx.read_jsonl(tmp_path / mx.JSONL)]
    np.testing.assert_allclose(logged, [float(sched(s)) for s in range(6)], rtol=1e-6)


def test_resume_is_bitwise(tmp_path, monkeypatch):
    spec = train.Spec.from_config(tiny_config())
    train.train(spec, tmp_path / "full")
    step = train.Trainer.step

    def interrupted(self):
        if int(self.state.step) == 4:  # after the checkpoint at 3 and one more step
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(train.Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(spec, tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    monkeypatch.undo()
    train.train(spec, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # bitwise, steps 1..6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """Two local CPU processes (jax.distributed, one device each) vs this process
    (eight devices): the same global batches, the same losses."""
    args = [f"--config={ROOT}/configs/dense.py:size=tiny"]
    args += [f"--config.{k}={v}" for k, v in {**TINY, "train.steps": 3}.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *cmd,
                "--workdir",
                str(tmp_path / "two"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ],
            cwd=ROOT,
            env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        train.train(train.Spec.from_config(tiny_config(**{"train.steps": 3})), tmp_path / "one")
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # a hung collective ignores SIGTERM
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    two, single = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [s for s, _ in two] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in two], [v for _, v in single], rtol=1e-5)


def test_moe_aux_loss_is_in_the_gradient_and_logged(tmp_path):
    cfg = tiny_config(**{"train.steps": 1})
    moe = pc.load(f"{ROOT}/configs/moe.py:size=tiny")
    with cfg.unlocked():
        cfg.model = moe.model
    pc.override(cfg, "model.moe.lb_coef", "10.0")  # make the term visible
    trainer = train.Trainer(train.Spec.from_config(cfg), tmp_path)
    batch = train._global_batch(next(trainer.data_iter), trainer.batch_sharding)
    graphdef, params, rest = trainer.graphdef, trainer.state.params, trainer.state.rest

    def reference(params, with_aux):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits, aux = model(
            batch["inputs"], positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"]
        )
        logp = jax.nn.log_softmax(logits)
        ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        loss = jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])
        return loss + aux["moe_aux_loss"] if with_aux else loss

    grad = jax.jit(lambda p, a: optax.tree.norm(jax.grad(reference)(p, a)), static_argnums=1)
    norms = [float(grad(params, a)) for a in (True, False)]
    _, metrics = trainer.train_step(trainer.state, batch)
    trainer.checkpointer.close()
    assert float(metrics["grad_norm"]) == pytest.approx(norms[0], rel=1e-4)
    assert norms[1] != pytest.approx(norms[0], rel=1e-3)
    assert metrics["expert_load"].shape == (cfg.model.n_layers, cfg.model.moe.num_experts)
    for key in ("moe_aux_loss", "moe_lb_loss", "moe_z_loss", "dropped_tokens"):
        assert metrics[key].shape == ()
