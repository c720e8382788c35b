"""The trainer: train state, the jitted train and eval steps, and the loop.

``Spec.from_config`` reads every section of a config once and validates it (no
compile); ``train(spec, workdir)`` runs it; ``plan(spec)`` describes it abstractly
(``launch.py --dry_run``).

The train state is the NNX model split into parameters and the rest (RNG
counters), the optimizer state and the step. The step is one jit with explicit
shardings and the state donated; gradient accumulation is a ``lax.scan`` over
microbatches inside it. The loop reads values back from the devices only at
logging, evaluation and checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from polyjax import checkpoint as ckpt
from polyjax import config as pc
from polyjax import metrics as mx
from polyjax import optim
from polyjax import sharding as shd
from polyjax.data import DataConfig, make_pipeline
from polyjax.fields import from_mapping
from polyjax.model import ModelConfig, flops_per_token, param_counts

Batch = Mapping[str, jax.Array]


NONFINITE_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop. Intervals are in steps (0 disables); ``peak_flops`` is one
    device's peak FLOP/s for the MFU (0: looked up from the device kind).

    ``nonfinite``: what a NaN/Inf in the loss or the gradients does. Either way the
    step does not apply that update. "stop": the parameters and optimizer state stay
    at the last good step and the run stops with a report at the next logging or
    checkpoint step. "skip": the update is skipped and the run goes on; it stops
    with a report once more than ``max_skips`` updates in total have been skipped.
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    peak_flops: float = 0.0
    nonfinite: str = "stop"
    max_skips: int = 10

    def __post_init__(self):
        minimum = {"steps": 1, "log_every": 1, "eval_batches": 1, "keep_checkpoints": 1}
        minimum.update(eval_every=0, checkpoint_every=0, seed=0, max_skips=0)
        for name, low in minimum.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"train.{name} must be an integer >= {low}, got {value!r}")
        if not self.peak_flops >= 0:
            raise ValueError(f"train.peak_flops must be >= 0, got {self.peak_flops!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"train.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, "
                f"got {self.nonfinite!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return from_mapping(cls, d, "train")


SECTIONS = ("name", "model", "data", "optim", "train", "mesh")
TYPED_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": optim.OptimConfig,
    "train": TrainConfig,
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated run: typed configs, the mesh, the plain config (for checkpoints)."""

    name: str
    model: ModelConfig
    data: DataConfig
    optim: optim.OptimConfig
    train: TrainConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    config: dict

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Spec:
        """Read and check every section (ValueError naming the field); nothing compiles."""
        unknown = sorted(set(config.keys()) - set(SECTIONS))
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
        plain = config.to_dict()
        if not isinstance(plain.get("name"), str):
            raise ValueError(f"name={plain.get('name')!r}: expected str")
        for section, section_cls in TYPED_SECTIONS.items():
            if not isinstance(plain.get(section), Mapping):
                raise ValueError(f"config: section {section} is missing or not a mapping")
            pc.check_types(section_cls, plain[section], section)
        mesh_shape = plain.get("mesh")
        bad_axes = sorted(set(mesh_shape or {}) - set(shd.MESH_AXES))
        if not isinstance(mesh_shape, Mapping) or bad_axes:
            raise ValueError(f"mesh: unknown axes {bad_axes}; valid: {', '.join(shd.MESH_AXES)}")
        for axis, size in mesh_shape.items():
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= -1 and size):
                raise ValueError(f"mesh.{axis}={size!r}: expected an integer >= 1 or -1")
        model = _section("model", ModelConfig.from_dict, plain["model"])
        data = _section("data", DataConfig.from_dict, plain["data"])
        if data.seq_len > model.max_seq_len:
            raise ValueError(
                f"data.seq_len={data.seq_len} exceeds model.max_seq_len={model.max_seq_len}"
            )
        vocab = {"byte": 257, "bpe": data.vocab_size}.get(data.tokenizer, 0)
        if vocab > model.vocab_size:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} is smaller than the {data.tokenizer} "
                f"tokenizer's vocabulary ({vocab})"
            )
        mesh = shd.make_mesh(mesh_shape)
        shd.validate(model, mesh, data.global_batch)
        opt = _section("optim", optim.OptimConfig.from_dict, plain["optim"])
        data_parallel = math.prod(mesh.shape[a] for a in shd.batch_sharding(mesh).spec[0])
        if data.global_batch % (data_parallel * opt.grad_accum):
            raise ValueError(
                f"data.global_batch={data.global_batch} must be a multiple of the "
                f"data-parallel size ({data_parallel}) x optim.grad_accum ({opt.grad_accum})"
            )
        tcfg = _section("train", TrainConfig.from_dict, plain["train"])
        return cls(
            name=plain["name"],
            model=model,
            data=data,
            optim=opt,
            train=tcfg,
            mesh=mesh,
            rules=shd.DEFAULT_RULES,
            config=json.loads(json.dumps(plain)),
        )


def _section(name: str, build, d: Mapping[str, Any]):
    """``build(d)``, its ValueError prefixed with the section's name."""
    try:
        return build(d)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"{name}") else f"{name}: {msg}") from None


@flax.struct.dataclass
class TrainState:
    """``step`` counts the batches consumed, skipped ones included; a step whose loss
    or gradients are not finite leaves ``params``, ``opt_state`` (so the learning-rate
    schedule's count too) and ``rest`` as they were, and is counted in ``nonfinite``;
    ``bad_step`` is the first such step under "stop", the latest under "skip"."""

    step: jax.Array  # int32 scalar: steps done
    params: nnx.State
    opt_state: Any
    rest: nnx.State  # the model's non-parameter state (RNG counters)
    nonfinite: jax.Array  # int32 scalar: non-finite steps so far
    bad_step: jax.Array  # int32 scalar: 0 = none


# ----------------------------------------------------------------------------
# Pure functions: loss, steps.


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
        batch["inputs"], positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"]
    )
    ce_sum = cross_entropy_sum(logits_BxLxV, batch["targets"], batch["weights"])
    return ce_sum, aux, nnx.split(model, nnx.Param, ...)[2]


def _microbatches(batch: Batch, k: int, sharding: NamedSharding) -> Batch:
    """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ... so that every
    device holds its share of every microbatch."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(sharding.mesh, P(None, *sharding.spec))
        )

    return jax.tree.map(split, batch)


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
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch (split into ``grad_accum``
    microbatches). Loss = weighted token cross-entropy + the MoE auxiliary loss.
    The update is applied only when the loss and the gradients are finite (and,
    under ``nonfinite="stop"``, no earlier step was non-finite)."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def loss(params, rest, mb):
        ce_sum, aux, rest = _forward(graphdef, params, rest, mb)
        value = ce_sum / total_weight + aux.get("moe_aux_loss", 0.0) / grad_accum
        return value, (ce_sum, aux, rest)

    grad_fn = jax.grad(loss, has_aux=True)
    if grad_accum == 1:
        grads, (ce_sum, aux, rest) = grad_fn(state.params, state.rest, batch)
    else:

        def body(carry, mb):
            grads_acc, rest = carry
            grads, (ce_sum, aux, rest) = grad_fn(state.params, rest, mb)
            return (jax.tree.map(jnp.add, grads_acc, grads), rest), (ce_sum, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        mbs = _microbatches(batch, grad_accum, batch_sharding)
        (grads, rest), (ce_sums, auxs) = jax.lax.scan(body, (zeros, state.rest), mbs)
        ce_sum = jnp.sum(ce_sums)
        aux = {
            k: jnp.sum(v, 0) if k == "dropped_tokens" else jnp.mean(v, 0) for k, v in auxs.items()
        }
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(ce_sum) & jnp.isfinite(grad_norm)
    if "moe_aux_loss" in aux:
        finite &= jnp.isfinite(aux["moe_aux_loss"])
    apply = finite & (state.nonfinite == 0) if nonfinite == "stop" else finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    first = state.bad_step == 0
    record_bad = ~finite & (first if nonfinite == "stop" else True)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(optax.apply_updates(state.params, updates), state.params),
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
        **{k: v for k, v in aux.items()},
    }
    return new_state, metrics


def diagnose(
    state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]]:
    """The loss of ``batch`` at ``state``, and per parameter (path -> value): the
    gradient's norm, whether it is finite, and the PolyCom coefficients."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def loss(params):
        ce_sum, aux, _ = _forward(graphdef, params, state.rest, batch)
        return ce_sum / total_weight + aux.get("moe_aux_loss", 0.0)

    value, grads = jax.value_and_grad(loss)(state.params)
    flat = {_path(p): g for p, g in nnx.to_flat_state(grads)}
    norms = {k: jnp.sqrt(jnp.sum(jnp.square(g.get_value()))) for k, g in flat.items()}
    finite = {k: jnp.all(jnp.isfinite(g.get_value())) for k, g in flat.items()}
    coeffs = {
        _path(p): v.get_value()
        for p, v in nnx.to_flat_state(state.params)
        if "coeffs" in map(str, p)
    }
    return value, norms, finite, coeffs


def _path(path: tuple) -> str:
    return ".".join(map(str, path))


def nonfinite_report(
    step: int, loss: float, norms: Mapping, finite: Mapping, coeffs: Mapping, why: str
) -> str:
    """A readable report of a non-finite step (values from ``diagnose``)."""
    bad = [k for k, ok in finite.items() if not ok]
    layers: dict[str, float] = {}
    for key, norm in norms.items():
        parts = key.split(".")
        group = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        layers[group] = math.hypot(layers.get(group, 0.0), float(norm))
    lines = [
        f"non-finite values at step {step}: {why}",
        f"  loss at the last good state on that batch: {loss}"
        + ("  (non-finite)" if not math.isfinite(loss) else ""),
        f"  non-finite gradient leaves ({len(bad)} of {len(finite)}): "
        + (", ".join(bad) if bad else "none"),
        "  gradient norm per layer: "
        + ", ".join(f"{k} {v:.4g}" for k, v in sorted(layers.items())),
        "  activation coefficients (PolyCom weight/bias per layer):",
        *(f"    {k}: {np.array2string(np.asarray(v), precision=4)}" for k, v in coeffs.items()),
    ]
    if not coeffs:
        lines[-1] += " none (no PolyCom activation)"
    return "\n".join(lines)


def eval_step(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch):
    """(sum of weighted cross-entropy, sum of weights) over one batch."""
    ce_sum, _, _ = _forward(graphdef, params, rest, batch)
    return ce_sum, jnp.sum(batch["weights"])


# ----------------------------------------------------------------------------
# Shardings and FLOPs.


def opt_shardings(opt_state: Any, mesh: jax.sharding.Mesh, rules) -> Any:
    """The optimizer state's shardings: the moments (NNX states mirroring the
    parameters) as the parameters, everything else (counts) replicated."""
    return jax.tree.map(
        lambda x: (
            shd.model_shardings(x, mesh, rules)
            if isinstance(x, nnx.State)
            else NamedSharding(mesh, P())
        ),
        opt_state,
        is_leaf=lambda x: isinstance(x, nnx.State),
    )


# ----------------------------------------------------------------------------
# The run.


def _global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> Batch:
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


class Trainer:
    """Everything a run needs, built from a ``Spec``: the model (sharded), the
    optimizer, the compiled steps, the data and the checkpointer."""

    def __init__(self, spec: Spec, workdir: str | pathlib.Path):
        self.spec = spec
        self.workdir = pathlib.Path(workdir)
        self.checkpointer = ckpt.Checkpointer(
            workdir,
            every=spec.train.checkpoint_every,
            keep=spec.train.keep_checkpoints,
            async_save=spec.train.async_checkpoint,
        )
        mesh, rules = spec.mesh, spec.rules
        self.pipeline = make_pipeline(
            spec.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        vocab = self.pipeline.tokenizer.vocab_size
        if vocab > spec.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={spec.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({vocab}); set model.vocab_size >= {vocab}"
            )
        model = shd.create_model(spec.model, mesh, rules, spec.train.seed)
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.eval_graphdef = nnx.split(
            nnx.view(model, deterministic=True, raise_if_not_found=False), nnx.Param, ...
        )[0]
        self.schedule = optim.lr_schedule(spec.optim, spec.train.steps)
        tx = optim.make_optimizer(spec.optim, spec.train.steps)
        self.batch_sharding = shd.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        opt_abstract = jax.eval_shape(tx.init, params)
        self.state_shardings = TrainState(
            step=replicated,
            params=shd.model_shardings(params, mesh, rules),
            opt_state=opt_shardings(opt_abstract, mesh, rules),
            rest=shd.model_shardings(rest, mesh, rules),
            nonfinite=replicated,
            bad_step=replicated,
        )
        zero = lambda: jnp.zeros((), jnp.int32)
        init = jax.jit(
            lambda p, r: TrainState(zero(), p, tx.init(p), r, zero(), zero()),
            out_shardings=self.state_shardings,
        )
        self.state = init(params, rest)
        self.train_step = jax.jit(
            functools.partial(
                train_step,
                graphdef=self.graphdef,
                tx=tx,
                schedule=self.schedule,
                grad_accum=spec.optim.grad_accum,
                batch_sharding=self.batch_sharding,
                nonfinite=spec.train.nonfinite,
            ),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            functools.partial(eval_step, self.eval_graphdef),
            in_shardings=(
                self.state_shardings.params,
                self.state_shardings.rest,
                self.batch_sharding,
            ),
            out_shardings=replicated,
        )
        self.data_iter = self.pipeline.train_iter()
        self.checked = (0, self.data_iter.get_state())  # (step, data state) at the last check
        self.skips_seen = 0
        self.eval_data = [
            _global_batch(b, self.batch_sharding)
            for b in self.pipeline.eval_batches(spec.train.eval_batches)
        ]

    def restore(self, step: int) -> None:
        self.state, data_state = self.checkpointer.restore(step, self.state)
        self.data_iter.set_state(data_state)
        self.checked = (step, data_state)

    def save(self) -> None:
        self.checkpointer.save(
            int(self.state.step), self.state, self.data_iter.get_state(), self.spec.config
        )

    def evaluate(self) -> dict[str, float]:
        sums = [self.eval_step(self.state.params, self.state.rest, b) for b in self.eval_data]
        ce, weight = np.sum(jax.device_get(sums), axis=0)
        loss = float(ce / max(weight, 1.0))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0))}

    def next_batch(self) -> Batch:
        return _global_batch(next(self.data_iter), self.batch_sharding)

    def step(self) -> dict[str, jax.Array]:
        """Train on the next batch; the metrics stay on the devices."""
        self.state, metrics = self.train_step(self.state, self.next_batch())
        return metrics

    def check_finite(self) -> None:
        """At a logging or checkpoint step (the host reads two scalars): raise
        ``NonFiniteError`` with a report when the policy says stop; warn of skips."""
        count, bad_step = (
            int(x) for x in jax.device_get((self.state.nonfinite, self.state.bad_step))
        )
        step = int(self.state.step)
        tcfg = self.spec.train
        if count and tcfg.nonfinite == "stop":
            why = "train.nonfinite='stop'; the state was kept at the last good step"
        elif count > tcfg.max_skips:
            why = f"{count} updates skipped in total, more than train.max_skips={tcfg.max_skips}"
        else:
            if count > self.skips_seen and jax.process_index() == 0:
                print(
                    f"warning: skipped {count - self.skips_seen} non-finite update(s) by step "
                    f"{step} (latest at step {bad_step}; {count} in total, limit {tcfg.max_skips})",
                    file=sys.stderr,
                    flush=True,
                )
            self.skips_seen = count
            self.checked = (step, self.data_iter.get_state())
            return
        raise NonFiniteError(bad_step, self.report(bad_step, why))

    def report(self, bad_step: int, why: str) -> str:
        """Replay the batch of ``bad_step`` (from the data state of the last check)
        and diagnose it at the current state."""
        checked_step, data_state = self.checked
        self.data_iter.set_state(data_state)
        for _ in range(bad_step - checked_step - 1):
            next(self.data_iter)
        fn = jax.jit(functools.partial(diagnose, graphdef=self.graphdef))
        loss, norms, finite, coeffs = jax.device_get(fn(self.state, self.next_batch()))
        return nonfinite_report(bad_step, float(loss), norms, finite, coeffs, why)


class NonFiniteError(RuntimeError):
    """A NaN or Inf stopped the run; ``str()`` is the report."""

    def __init__(self, step: int, report: str):
        super().__init__(report)
        self.step = step


class PreemptionError(Exception):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT


class StopSignals:
    """Within ``with``: SIGTERM/SIGINT set ``self.signum`` (the loop stops at the
    next step boundary); a second one raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, boundary: bool) -> int:
        """The signal to stop on, the same on every process: on one process, this
        one's at every step; on several, any process's, agreed at ``boundary``
        steps (logging and checkpoint steps) by a tiny all-gather."""
        if jax.process_count() == 1:
            return self.signum
        if not boundary:
            return 0
        seen = multihost_utils.process_allgather(np.array([self.signum], np.int32))
        return int(np.max(seen))


def prepare_workdir(spec: Spec, workdir: str | pathlib.Path) -> int | None:
    """The step to resume from: the newest intact checkpoint (None: a fresh run).
    Refuses (ValueError, nothing touched) a workdir whose checkpoints belong to an
    incompatible config or whose checkpoints are all torn or corrupt."""
    found = ckpt.latest(workdir)
    if found is None:
        return None
    step, saved = found
    ckpt.check_compatible(saved, spec.config, str(workdir))
    return step


def train(spec: Spec, workdir: str | pathlib.Path, out: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) ``spec`` in ``workdir``; returns the final metrics."""
    out = out or sys.stdout
    primary = jax.process_index() == 0
    say = (lambda s: print(s, file=out, flush=True)) if primary else (lambda s: None)
    resume = prepare_workdir(spec, workdir)
    _, bad = ckpt.scan(workdir)
    if bad:
        moved = ckpt.set_aside(workdir, [s for s, _ in bad])
        for (s, why), path in zip(bad, moved, strict=True):
            if primary:
                print(
                    f"warning: checkpoint {s} is torn or corrupt ({why}); skipped it and "
                    f"moved it to {path}; resuming from step {resume}",
                    file=sys.stderr,
                    flush=True,
                )
    trainer = Trainer(spec, workdir)
    tcfg = spec.train
    writer = None
    signals = StopSignals().__enter__()
    try:
        if resume is not None:
            trainer.restore(resume)
            say(f"resumed from {ckpt.directory(workdir)} at step {resume}")
        start = int(trainer.state.step)
        writer = mx.Writer(workdir, resume_step=start) if primary else None
        if primary:
            (pathlib.Path(workdir) / "config.json").write_text(json.dumps(spec.config, indent=2))
        progress = mx.Progress(tcfg.steps, start, out)
        unigram = trainer.pipeline.unigram_loss()
        tokens_per_step = spec.data.global_batch * spec.data.seq_len
        flops_per_step = flops_per_token(spec.model, spec.data.seq_len) * tokens_per_step
        peak = mx.peak_flops(jax.devices()[0].device_kind, tcfg.peak_flops)
        say(
            f"{spec.name}: {tcfg.steps} steps of {tokens_per_step} tokens on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
            f"unigram baseline {unigram:.4f} nats/token"
        )
        loss_sum, loss_count, t_last, step_last = 0.0, 0, None, start
        record: dict[str, Any] = {}
        for step in range(start + 1, tcfg.steps + 1):
            metrics = trainer.step()
            loss_sum, loss_count = loss_sum + metrics["loss"], loss_count + 1
            if t_last is None:  # the first step compiles: time from its end
                jax.block_until_ready(metrics)
                t_last, step_last = time.perf_counter(), step
            last = step == tcfg.steps
            log = step % tcfg.log_every == 0 or last
            evaluate = (tcfg.eval_every and step % tcfg.eval_every == 0) or last
            if log or evaluate:
                record = jax.device_get(dict(metrics, loss=loss_sum / loss_count))
                loss_sum, loss_count = 0.0, 0
                now = time.perf_counter()
                if step > step_last:
                    rate = (step - step_last) * tokens_per_step / (now - t_last)
                    record["tokens_per_s"] = rate
                    if peak:
                        record["mfu"] = (
                            rate / tokens_per_step * flops_per_step / (peak * jax.device_count())
                        )
                    t_last, step_last = now, step
                if evaluate:
                    record.update(trainer.evaluate())
                    t_last = time.perf_counter()  # evaluation is not training time
                if writer:
                    writer.write(step, record)
                    extra = f"  val {record['val_loss']:.4f}" if evaluate else ""
                    progress.update(
                        step, float(record["loss"]), record.get("tokens_per_s", 0), extra
                    )
            save = trainer.checkpointer.due(step) or last
            stop = signals.agreed(log or save)
            if log or save or stop:  # never save a non-finite state
                trainer.check_finite()
            if save or stop:
                trainer.save()
            if stop:
                trainer.checkpointer.finish()
                raise PreemptionError(step, stop)
        if writer:
            writer.close()
            records = mx.read_jsonl(writer.path)
            mx.plot_losses(records, pathlib.Path(workdir) / mx.PLOT, baseline=unigram)
            final = {"unigram_loss": unigram, "workdir": str(workdir)}
            progress.message("summary:\n" + mx.summary(records, final))
            record = {**(records[-1] if records else {}), **final}
            (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(record, indent=2))
        return {**record, "unigram_loss": unigram}
    finally:
        signals.__exit__()
        if writer:
            writer.close()
        trainer.checkpointer.close()


# ----------------------------------------------------------------------------
# The dry run.


def plan(spec: Spec) -> str:
    """Parameter counts, the mesh and the sharding plan, computed abstractly."""
    counts = param_counts(spec.model)
    mesh = spec.mesh
    return "\n".join(
        [
            f"config {spec.name}",
            f"parameters: total {counts['total']:,}  active {counts['active']:,}  "
            f"embedding {counts['embedding']:,}",
            f"devices: {mesh.devices.size} x {jax.devices()[0].device_kind}",
            f"batch: {spec.data.global_batch} x {spec.data.seq_len} tokens, "
            f"{shd.batch_sharding(mesh).spec}, {spec.optim.grad_accum} microbatch(es)",
            f"training FLOPs/token: {flops_per_token(spec.model, spec.data.seq_len):.4g}",
            "sharding plan (parameter, shape, logical axes -> mesh axes):",
            shd.describe(spec.model, mesh, spec.rules),
        ]
    )
