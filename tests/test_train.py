"""The trainer: loss, gradient accumulation, bitwise resume, two processes."""

import collections
import contextlib
import io
import itertools
import json
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import moe
from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax import optim, train
from polyjax import sharding as shd
from polyjax.config import InputError, Spec
from polyjax.data import make_pipeline, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = {"train.steps": 6, "train.checkpoint_every": 3}


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


def test_grad_accumulation_equals_the_big_batch(tiny):
    specs = [tiny.spec(**RUN, **{"optim.grad_accum": k, "data.global_batch": 16}) for k in (1, 2)]
    (_, steps1, state1, batches), (_, steps2, state2, _) = (tiny.build(s) for s in specs)
    batch = next(batches)
    (s1, m1), (s2, m2) = steps1.train(state1, batch), steps2.train(state2, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    # Adam's first step is ~ lr * sign(g): tolerate a thousandth of a step where g ~ 0
    atol = 1e-3 * specs[0].optim.lr
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
    assert int(s1.step) == int(s2.step) == 1


def test_steps_build_from_an_abstract_model(tiny):
    """make_steps reads only the model's structure: from an abstract model (what a
    dry run has) the update step traces to the same state as from the real one."""
    spec = tiny.spec(**RUN)
    abstract = nnx.eval_shape(lambda: shd.create_model(spec.model, spec.mesh, spec.rules, 0))
    steps = train.make_steps(spec, abstract)
    state = jax.eval_shape(steps.init, *nnx.split(abstract, nnx.Param, ...)[1:])
    batch = {
        k: jax.ShapeDtypeStruct((8, 16), dtype, sharding=steps.batch_sharding)
        for k, dtype in (("inputs", "int32"), ("targets", "int32"), ("positions", "int32"))
    }
    batch["segment_ids"] = batch["inputs"]
    batch["weights"] = jax.ShapeDtypeStruct((8, 16), "float32", sharding=steps.batch_sharding)
    new_state, metrics = jax.eval_shape(steps.train, state, batch)
    _, _, real, _ = tiny.build(spec)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(new_state) == shapes(real) and metrics["loss"].shape == ()
    assert steps.train.lower(state, batch).as_text()  # lowers without any array


@contextlib.contextmanager
def compiles():
    """A Counter of the XLA compilations (by function name) made inside."""
    counts = collections.Counter()

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[kwargs.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_loss_decreases_and_state_is_checkpointed(tmp_path, tiny):
    """... and each step compiles once: step 2 reuses step 1's executable (a state
    whose types, shardings or trace context changed after step 1 would compile again)."""
    spec = tiny.spec(**RUN, **{"optim.lr": 3e-3})
    with compiles() as counts:
        out = train.train(spec, tmp_path)
    assert counts["jit(train_step)"] == 1 and counts["jit(eval_step)"] == 1, counts
    curve = [loss for _, loss in losses(tmp_path)]
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 7))
    assert curve[-1] < curve[0]
    assert out["val_ppl"] == pytest.approx(math.exp(out["val_loss"]))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert (tmp_path / mx.PLOT).stat().st_size > 0
    sched = optim.lr_schedule(spec.optim, spec.train.steps)
    logged = [r["lr"] for r in mx.read_jsonl(tmp_path / mx.JSONL)]
    np.testing.assert_allclose(logged, [float(sched(s)) for s in range(6)], rtol=1e-6)


def test_resume_is_bitwise(tmp_path, tiny, monkeypatch):
    spec = tiny.spec(**RUN)
    train.train(spec, tmp_path / "full")
    real = pipeline.TrainIterator.__next__

    def interrupted(self):
        if self.get_state()["next_batch"] == 4:  # after the checkpoint at 3 and one more step
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(spec, tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    monkeypatch.undo()
    train.train(spec, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # bitwise, steps 1..6


def test_resume_with_a_changed_config_says_so_keeps_the_history_and_the_stream(
    tmp_path, tiny, trained, monkeypatch
):
    """The trained run (6 steps of batch 8) resumed with another lr, more steps and
    batch 32 (48 windows read: not a multiple of it): one line per changed field,
    config.json the new config and the history both segments; the windows read next
    are the uninterrupted stream's next ones (windows 48..111, read independently),
    and the run goes on to step 8."""
    shutil.copytree(trained.path, tmp_path / "run")
    before = json.loads((trained.path / "config.json").read_text())
    changed = {"optim.lr": 2e-3, "train.steps": 8, "data.global_batch": 32}
    spec = tiny.spec(**{**trained.run, **changed})
    read = []
    real = pipeline.TrainIterator.__next__
    monkeypatch.setattr(
        pipeline.TrainIterator, "__next__", lambda self: read.append(real(self)) or read[-1]
    )
    out = io.StringIO()
    train.train(spec, tmp_path / "run", out=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("config changed")]
    assert lines == [
        "config changed since step 6: data.global_batch: 8 -> 32",
        "config changed since step 6: optim.lr: 0.001 -> 0.002",
        "config changed since step 6: train.steps: 6 -> 8",
    ]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == spec.config
    history = mx.read_jsonl(tmp_path / "run" / ckpt.HISTORY)
    assert [h["start_step"] for h in history] == [0, 6]
    assert [h["config"] for h in history] == [before, spec.config]
    monkeypatch.undo()
    p = make_pipeline(tiny.spec(**trained.run).data)
    windows = np.concatenate([b["inputs"] for b in itertools.islice(p.train_iter(), 14)])
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in read[:2]]), windows[48:112])
    assert [r["step"] for r in mx.read_jsonl(tmp_path / "run" / mx.JSONL)] == list(range(1, 9))


def test_resume_on_changed_data_is_one_line_before_compiling(
    tmp_path, tiny, trained, monkeypatch, compiled
):
    """The same config over data whose tokens changed on disk (the stream's
    fingerprint differs): refused in one line naming the checkpoint, nothing compiled."""
    shutil.copytree(trained.path, tmp_path / "run")
    real = pipeline._spans
    monkeypatch.setattr(pipeline, "_spans", lambda cfg: (*real(cfg)[:3], "edited"))
    with pytest.raises(InputError, match=r"checkpoint 6: .*\['data'\] differ") as e:
        train.train(tiny.spec(**trained.run), tmp_path / "run")
    assert "\n" not in str(e.value) and compiled() == []


def test_summary_reports_the_mean_tokens_per_s_beside_the_last_interval(trained):
    """summary.json: ``tokens_per_s`` is the last logged interval's;
    ``tokens_per_s_mean`` the run's timed tokens over their time, which is the
    step-weighted harmonic mean of the logged intervals' rates (step 1 compiles and
    is not timed)."""
    records = [r for r in mx.read_jsonl(trained.path / mx.JSONL) if "tokens_per_s" in r]
    steps = np.diff([1] + [r["step"] for r in records])
    rates = np.array([r["tokens_per_s"] for r in records])
    summary = json.loads((trained.path / "summary.json").read_text())
    assert summary["timed_steps"] == steps.sum() == trained.run["train.steps"] - 1
    assert summary["tokens_per_s"] == records[-1]["tokens_per_s"]
    assert summary["tokens_per_s_mean"] == pytest.approx(steps.sum() / (steps / rates).sum())


def test_two_processes_match_one_and_one_resumes_them(
    tmp_path, tiny, trained, two_processes, launch_py
):
    """Two local CPU processes (jax.distributed, one device each: the shared
    ``two_processes`` run) vs one process (eight devices, the shared ``trained`` run
    of the same steps): the same global batches, the same losses. Their checkpoint
    resumes in one process: a data iterator's state is the next global batch,
    whatever the process count."""
    run = RUN
    assert {k: trained.run[k] for k in RUN} == RUN and two_processes.run == trained.run
    two, single = losses(two_processes.path), losses(trained.path)
    assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in two], [v for _, v in single], rtol=1e-5)
    resumed = tmp_path / "resumed"
    shutil.copytree(two_processes.path, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    saved = json.loads((resumed / "checkpoints" / "3" / "data" / "metadata").read_text())
    assert len(saved["process_states"]) == 2
    result = launch_py(*tiny.argv(**run), f"--workdir={resumed}")
    assert result.code == 0 and "at step 3" in result.out, result.err
    again = losses(resumed)
    assert [s for s, _ in again] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in again], [v for _, v in single], rtol=1e-5)


def test_moe_aux_loss_is_in_the_gradient_and_logged(tiny):
    cfg = tiny.config(**{**RUN, "train.steps": 1})
    with cfg.unlocked():
        cfg.model = moe.get_config("size=tiny").model
    cfg.model.moe.lb_coef = 10.0  # make the term visible
    graphdef, steps, state, batches = tiny.build(Spec.from_config(cfg))
    batch = next(batches)
    params, rest = state.params, state.rest

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
    _, metrics = steps.train(state, batch)
    assert float(metrics["grad_norm"]) == pytest.approx(norms[0], rel=1e-4)
    assert norms[1] != pytest.approx(norms[0], rel=1e-3)
    assert metrics["expert_load"].shape == (cfg.model.n_layers, cfg.model.moe.num_experts)
    for key in ("moe_aux_loss", "moe_lb_loss", "moe_z_loss", "dropped_tokens"):
        assert metrics[key].shape == ()
