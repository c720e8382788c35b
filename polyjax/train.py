"""Training: the train state, the update step, and the loop.

``train(spec, workdir)`` runs a validated config (``polyjax.config.Spec``),
resuming from the newest intact checkpoint of ``workdir``. The update step is one
jit with explicit shardings and the state donated (gradient accumulation: a
``lax.scan`` over microbatches inside it), built by ``make_steps``. The loop
dispatches step t before it reads step t-1's metrics, so the host waits for the
devices only to evaluate and to save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from polyjax import checkpoint as ckpt
from polyjax import data, nonfinite, optim, profile
from polyjax import metrics as mx
from polyjax import sharding as shd
from polyjax import workdir as wd
from polyjax.config import Spec, checked_input
from polyjax.data import make_pipeline
from polyjax.model import flops_per_token

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """``step`` counts the batches consumed, skipped ones included; a step whose loss,
    gradients or new state are not finite leaves ``params``, ``opt_state`` (so the learning-rate
    schedule's count too) and ``rest`` as they were, and is counted in ``nonfinite``;
    ``bad_step`` is the first such step under "stop", the latest under "skip"."""

    step: jax.Array  # int32 scalar: steps done
    params: nnx.State
    opt_state: Any
    rest: nnx.State  # the model's non-parameter state (RNG counters)
    nonfinite: jax.Array  # int32 scalar: non-finite steps so far
    bad_step: jax.Array  # int32 scalar: 0 = none


# =============================================================================
# The update step: pure functions of the state and a batch.


def cross_entropy_sum(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array
) -> jax.Array:
    """Sum over tokens of weight x cross-entropy (nats), in fp32."""
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    return jnp.sum(ce_BxL * weights_BxL)


def _forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch):
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables in this trace
    logits_BxLxV, aux = model(
        batch["inputs"], positions_BxL=batch["positions"], segment_ids_BxL=batch.get("segment_ids")
    )
    ce_sum = cross_entropy_sum(logits_BxLxV, batch["targets"], batch["weights"])
    return ce_sum, aux, nnx.split(model, nnx.Param, ...)[2]


def _loss(graphdef, params, rest, batch, *, total_weight, aux_div):
    """The loss (token cross-entropy / ``total_weight`` + MoE aux / ``aux_div``),
    and (cross-entropy sum, aux terms, the model's new non-parameter state)."""
    ce_sum, aux, rest = _forward(graphdef, params, rest, batch)
    return ce_sum / total_weight + aux.get("moe_aux_loss", 0.0) / aux_div, (ce_sum, aux, rest)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    batch_sharding: NamedSharding,
    nonfinite: str = "stop",
    segments: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch (split into ``grad_accum``
    microbatches). Loss = weighted token cross-entropy + the MoE auxiliary loss.
    The update is applied only when the loss, the gradients and the new parameters
    and optimizer state are finite (and, under ``nonfinite="stop"``, no earlier step
    was non-finite). ``segments`` False: the rows hold one stream each (no document
    boundaries), so attention needs no segment mask."""
    batch = _segments(batch, segments)
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    loss = functools.partial(_loss, graphdef, total_weight=total_weight, aux_div=grad_accum)
    grad_fn = jax.grad(loss, has_aux=True)
    if grad_accum == 1:
        grads, (ce_sum, aux, rest) = grad_fn(state.params, state.rest, batch)
    else:

        def body(carry, mb):
            grads_acc, rest = carry
            grads, (ce_sum, aux, rest) = grad_fn(state.params, rest, mb)
            return (jax.tree.map(jnp.add, grads_acc, grads), rest), (ce_sum, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        mbs = shd.microbatches(batch, grad_accum, batch_sharding)
        (grads, rest), (ce_sums, auxs) = jax.lax.scan(body, (zeros, state.rest), mbs)
        ce_sum = jnp.sum(ce_sums)
        aux = {
            k: jnp.sum(v, 0) if k == "dropped_tokens" else jnp.mean(v, 0) for k, v in auxs.items()
        }
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(ce_sum) & jnp.isfinite(grad_norm) & all_finite((params, opt_state))
    if "moe_aux_loss" in aux:
        finite &= jnp.isfinite(aux["moe_aux_loss"])
    apply = finite & (state.nonfinite == 0) if nonfinite == "stop" else finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    first = state.bad_step == 0
    record_bad = ~finite & (first if nonfinite == "stop" else True)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rest=keep(rest, state.rest),
        nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        bad_step=jnp.where(record_bad, state.step + 1, state.bad_step),
    )
    metrics = {
        "loss": ce_sum / total_weight,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "nonfinite": new_state.nonfinite,
        "bad_step": new_state.bad_step,  # for the check; not logged
        **aux,
    }
    return new_state, metrics


def all_finite(tree: Any) -> jax.Array:
    """True when the floating-point leaves of ``tree`` hold no NaN or Inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _segments(batch: Batch, segments: bool) -> Batch:
    """``batch`` without its segment ids when they are all one (``segments`` False)."""
    return batch if segments else {k: v for k, v in batch.items() if k != "segment_ids"}


def eval_step(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch, segments: bool = True
):
    """(sum of weighted cross-entropy, sum of weights) over one batch."""
    ce_sum, _, _ = _forward(graphdef, params, rest, _segments(batch, segments))
    return ce_sum, jnp.sum(batch["weights"])


def diagnose_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef):
    """``nonfinite.diagnose`` of the loss of ``batch`` at ``state``."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    loss = functools.partial(_loss, graphdef, total_weight=total_weight, aux_div=1)
    return nonfinite.diagnose(lambda p: loss(p, state.rest, batch)[0], state.params)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of a run and the shardings they are compiled for."""

    init: Callable  # (params, rest) -> TrainState in its shardings
    train: Callable  # (state, batch) -> (state, metrics); donates the state
    eval: Callable  # (params, rest, batch) -> (sum of weighted CE, sum of weights)
    diagnose: Callable  # (state, batch) -> diagnose_step's values
    state_shardings: TrainState
    batch_sharding: NamedSharding


def make_steps(spec: Spec, model: nnx.Module) -> Steps:
    """The jitted steps of ``spec`` for ``model``'s structure (its values are never
    read: ``steps.train.lower(...)`` on an abstract state compiles nothing big)."""
    mesh, rules, steps = spec.mesh, spec.rules, spec.train.steps
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    eval_graphdef = nnx.split(eval_view, nnx.Param, ...)[0]
    tx = optim.make_optimizer(spec.optim, steps)
    replicated = NamedSharding(mesh, P())
    batch_sharding = shd.batch_sharding(mesh)
    shardings = TrainState(
        step=replicated,
        params=shd.model_shardings(params, mesh, rules),
        opt_state=shd.opt_shardings(jax.eval_shape(tx.init, params), mesh, rules),
        rest=shd.model_shardings(rest, mesh, rules),
        nonfinite=replicated,
        bad_step=replicated,
    )
    zero = lambda: jnp.zeros((), jnp.int32)
    segments = spec.data.document_boundaries  # else the segment ids are all one
    update = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        schedule=optim.lr_schedule(spec.optim, steps),
        grad_accum=spec.optim.grad_accum,
        batch_sharding=batch_sharding,
        nonfinite=spec.train.nonfinite,
        segments=segments,
    )
    return Steps(
        init=jax.jit(
            lambda p, r: TrainState(zero(), p, tx.init(p), r, zero(), zero()),
            out_shardings=shardings,
        ),
        train=jax.jit(
            update,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        ),
        eval=jax.jit(
            functools.partial(eval_step, eval_graphdef, segments=segments),
            in_shardings=(shardings.params, shardings.rest, batch_sharding),
            out_shardings=replicated,
        ),
        diagnose=jax.jit(functools.partial(diagnose_step, graphdef=graphdef)),
        state_shardings=shardings,
        batch_sharding=batch_sharding,
    )


# =============================================================================
# The run.


def check_data(spec: Spec) -> data.Checked:
    """``polyjax.data.validate`` of the run's data against its model: the files, the
    tokenizer and the stores' metadata (the vocabulary before any tokenising), nothing
    tokenised or written. ValueError: one line naming the path and the fix."""
    return data.validate(
        spec.data,
        model_vocab_size=spec.model.vocab_size,
        max_seq_len=spec.model.max_seq_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def check_inputs(spec: Spec, workdir: str | os.PathLike, verify: bool = True) -> ckpt.Resume:
    """The checks that read little and write nothing, cheapest first: the data
    (``check_data``), the workdir's lock, then its checkpoints (compatible with
    ``spec``; the newest intact one, checksummed in full with ``verify``).
    ValueError: one line naming the field or path and the fix. Returns where the
    run resumes."""
    check_data(spec)
    wd.check(workdir)
    return ckpt.find_resume(workdir, spec.config, full=verify)


def train(spec: Spec, workdir: str | os.PathLike, out: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) ``spec`` in ``workdir``; returns the final metrics. Bad input
    is an ``InputError`` (one line) before anything is written or compiled."""
    # --- Config, data and workdir, checked before anything is written or compiled.
    tcfg, mesh, workdir = spec.train, spec.mesh, wd.path(workdir)
    primary = jax.process_index() == 0
    say = lambda s: print(s, file=out or sys.stdout, flush=True) if primary else None
    with checked_input():  # the data opened (tokenised and cached on first use)
        found = check_inputs(spec, workdir, verify=primary)
        pipeline = make_pipeline(
            spec.data,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_seq_len=spec.model.max_seq_len,
            model_vocab_size=spec.model.vocab_size,
        )
        data_iter = pipeline.train_iter()
        if found.step is not None:  # the data on disk is still the stream it saved
            try:
                data_iter.check_state(ckpt.data_state(workdir, found.step))
            except ValueError as e:
                raise ValueError(f"{workdir}, checkpoint {found.step}: {e}") from None
    if found.step is not None:
        for change in ckpt.config_changes(found.config, spec.config):
            say(f"config changed since step {found.step}: {change}")

    with contextlib.ExitStack() as stack:
        # --- The workdir: locked, damaged checkpoints set aside. --------------------
        stack.enter_context(wd.Lock(workdir))
        ckpt.set_aside(workdir, found.bad, found.step)
        resume = ckpt.agreed_step(found.step)
        start = resume or 0

        # --- Input pipeline. --------------------------------------------------------
        next_batch = lambda: shd.put_batch(next(data_iter), steps.batch_sharding)

        # --- Model and optimizer; shard and transfer. -------------------------------
        model = shd.create_model(spec.model, mesh, spec.rules, tcfg.seed)  # created sharded
        steps = make_steps(spec, model)
        state = steps.init(*nnx.split(model, nnx.Param, ...)[1:])
        del model

        # --- Checkpoint/resume: the newest step that restores to a finite state. ------
        checkpointer = stack.enter_context(
            ckpt.Checkpointer(
                workdir,
                every=tcfg.checkpoint_every,
                keep=tcfg.keep_checkpoints,
                async_save=tcfg.async_checkpoint,
            )
        )
        if resume is not None:
            start, state, data_state = checkpointer.restore_newest(state, spec.config, resume)
            data_iter.set_state(data_state)
            say(f"resumed from {ckpt.directory(workdir)} at step {start}")
        if primary and start < tcfg.steps:  # config.json; this segment's in the history
            ckpt.record_config(workdir, spec.config, start)
        signals = stack.enter_context(ckpt.StopSignals())
        progress = mx.Progress(tcfg.steps, start, out)
        writer = stack.enter_context(mx.Writer(workdir, start, progress, primary))

        # --- Evals. ------------------------------------------------------------
        eval_data = [
            shd.put_batch(b, steps.batch_sharding) for b in pipeline.eval_batches(tcfg.eval_batches)
        ]

        def evaluate() -> dict[str, Any]:
            """The loss over the evaluation batches, and each batch's sums (so that a
            study can split the held-out windows, e.g. to choose on one half)."""
            sums = np.asarray(
                jax.device_get([steps.eval(state.params, state.rest, b) for b in eval_data])
            )
            ce, weight = sums.sum(axis=0)
            loss = float(ce / max(weight, 1.0))
            per_batch = {"val_batch_ce": sums[:, 0], "val_batch_tokens": sums[:, 1]}
            return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), **per_batch}

        # --- The loop. -----------------------------------------------------------
        unigram = pipeline.unigram_loss()
        tokens = spec.data.global_batch * spec.data.seq_len
        flops = flops_per_token(spec.model, spec.data.seq_len) * tokens
        peak = mx.peak_flops(jax.devices()[0].device_kind, tcfg.peak_flops)
        meter = mx.Throughput(tokens, flops, peak and peak * jax.device_count())
        policy = nonfinite.Policy(tcfg.nonfinite, tcfg.max_skips, (start, data_iter.get_state()))
        say(
            f"{spec.name}: {tcfg.steps} steps of {tokens} tokens on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
            f"unigram baseline {unigram:.4f} nats/token"
        )

        def log(step: int, metrics: dict, evals: dict, data_state: Any) -> dict:
            """Read a logged step's values back and write them; stop if the
            non-finite policy says so, with a report on the bad step's batch
            (replayed from the last check passed) diagnosed at ``state``."""
            record = {**jax.device_get(metrics), **meter.measure(step), **evals}
            bad_step = int(record.pop("bad_step"))
            writer.write(step, record)
            why = policy.why_stop(step, int(record["nonfinite"]), bad_step, data_state)
            if why:
                checked_step, checked_data = policy.checked
                data_iter.set_state(checked_data)
                for _ in range(bad_step - checked_step - 1):
                    next(data_iter)
                loss, *values = jax.device_get(steps.diagnose(state, next_batch()))
                report = nonfinite.report(bad_step, float(loss), *values, why)
                raise nonfinite.NonFiniteError(bad_step, report)
            return record

        window = stack.enter_context(profile.Window(workdir, tcfg.profile_steps, start, say))
        losses, pending, record = [], None, {}
        for step in range(start + 1, tcfg.steps + 1):
            state, metrics = steps.train(state, next_batch())
            window.after(step, (state, metrics))  # a profiler trace of train.profile_steps
            losses.append(metrics["loss"])
            if step == start + 1:  # the first step compiles: time from its end
                jax.block_until_ready(metrics)
                meter.start(step)
            if pending:  # step t-1's metrics, read while step t runs
                record, pending = log(*pending), None
            last = step == tcfg.steps
            evaluating = (tcfg.eval_every and step % tcfg.eval_every == 0) or last
            save = checkpointer.due(step) or last
            boundary = step % tcfg.log_every == 0 or evaluating or save
            stop = signals.agreed(boundary)
            checkpointer.check(boundary)  # a save that failed in the background stops here
            if boundary or stop:
                if evaluating:  # the steps still running count as training, not evaluation
                    jax.block_until_ready(metrics)
                with meter.paused():
                    evals = evaluate() if evaluating else {}
                mean = dict(metrics, loss=sum(losses) / len(losses))
                losses, pending = [], (step, mean, evals, data_iter.get_state())
            if save or stop:  # read back and checked first: never save a non-finite state
                record, pending = log(*pending), None
                checkpointer.save(step, state, data_iter.get_state(), spec.config)
            if stop:
                checkpointer.finish()
                raise ckpt.PreemptionError(step, stop)
        if pending:
            record = log(*pending)
        checkpointer.finish()  # the last save, committed and marked (or a SaveError)

        if primary:
            writer.close()
            record = mx.finish(workdir, unigram, writer.progress, meter.mean())
        return {**record, "unigram_loss": unigram}


def restore_model(spec: Spec, workdir: str | os.PathLike) -> tuple[nnx.Module, int]:
    """The model (its evaluation view) of the newest checkpoint in ``workdir`` that
    verifies as for a resume (its files against their marker, a finite state; a
    damaged step is skipped with a warning, and not moved), and its step.
    ValueError: there is none."""
    found = ckpt.find_resume(workdir, spec.config)
    if found.step is None:
        raise ValueError(f"{workdir}: no checkpoint to restore")
    for step, why in found.bad:
        print(f"warning: checkpoint {step} is damaged ({why}); skipped it", file=sys.stderr)
    model = shd.create_model(spec.model, spec.mesh, spec.rules, spec.train.seed)
    steps = make_steps(spec, model)
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(view, nnx.Param, ...)
    with ckpt.Checkpointer(workdir, every=0, keep=1, async_save=False) as checkpointer:
        target = steps.init(params, rest)
        step, state, _ = checkpointer.restore_newest(
            target, spec.config, found.step, move_aside=False
        )
    return nnx.merge(graphdef, state.params, state.rest), step
