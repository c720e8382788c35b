"""A run's config, validated: ``Spec.from_config(config)`` reads every section once,
checks it and builds the mesh, so that bad input fails here, in one line naming
the field, before anything is built or compiled.

A config is a mapping (in practice an ``ml_collections.ConfigDict`` from a file
of ``configs/``, parsed by ``launch.py``) with the sections ``SECTIONS``; each
section is read by one dataclass (``TYPED_SECTIONS``) and the mesh by
``polyjax.sharding``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from polyjax import optim
from polyjax import sharding as shd
from polyjax.data import DataConfig
from polyjax.fields import check_types, from_mapping
from polyjax.model import ModelConfig

NONFINITE_POLICIES = ("stop", "skip")


class InputError(ValueError):
    """Bad input (config, data, workdir) found before anything was written or compiled;
    ``str()`` is one line naming the field or path and the fix (launch.py: exit 2)."""


@contextlib.contextmanager
def checked_input() -> Iterator[None]:
    """Inside: a ValueError is bad input, raised as an ``InputError`` (one line) on
    every process once all have reached the end of the block (a process whose own
    checks passed is told which process refused), so that no process goes on alone."""
    error = None
    try:
        yield
    except ValueError as e:
        error = InputError(" ".join(str(e).split()))
    if jax.process_count() > 1:
        refused = multihost_utils.process_allgather(np.array([error is not None], np.int32))
        if error is None and refused.any():
            first = int(np.argmax(refused.ravel()))
            error = InputError(f"process {first} refused its input (see its error)")
    if error is not None:
        raise error


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop. Intervals are in steps (0 disables); ``peak_flops`` is one
    device's peak FLOP/s for the MFU (0: looked up from the device kind).

    ``nonfinite``: what a NaN/Inf in the loss or the gradients does. Either way the
    step does not apply that update. "stop": the parameters and optimizer state stay
    at the last good step and the run stops with a report at the next check (a
    logging or checkpoint step). "skip": the update is skipped and the run goes on;
    it stops with a report once more than ``max_skips`` updates in total have been
    skipped.

    ``profile_steps=(start, stop)``: a ``jax.profiler`` trace of steps start..stop-1
    (as ``range``), written under ``<workdir>/tensorboard/plugins/profile/`` for
    TensorBoard's profile plugin or XProf; ``(0, 0)``: no trace.
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
    profile_steps: tuple[int, int] = (0, 0)

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
        window = tuple(self.profile_steps)
        object.__setattr__(self, "profile_steps", window)  # a list from JSON, a tuple here
        if window != (0, 0) and not (
            len(window) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in window)
            and 1 <= window[0] < window[1] <= self.steps + 1
        ):
            raise ValueError(
                f"train.profile_steps={window!r}: expected (start, stop) with 1 <= start < "
                f"stop <= train.steps + 1 = {self.steps + 1} (steps start..stop-1 are traced), "
                "or (0, 0) for none"
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
    def from_config(cls, config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Spec:
        """Read and check every section (ValueError naming the field); nothing compiles.
        ``devices``: the mesh's devices (default ``jax.devices()``; a compile target's
        abstract devices for ``polyjax.aot``)."""
        plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        unknown = sorted(set(plain) - set(SECTIONS))
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
        if not isinstance(plain.get("name"), str):
            raise ValueError(f"name={plain.get('name')!r}: expected str")
        for section, section_cls in TYPED_SECTIONS.items():
            if not isinstance(plain.get(section), Mapping):
                raise ValueError(f"config: section {section} is missing or not a mapping")
            check_types(section_cls, plain[section], section)
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
        # tokens: stores carry their tokenizer (checked by polyjax.data.validate)
        sized = {"byte": 257, "bpe": data.vocab_size}
        vocab = 0 if data.source.startswith("tokens:") else sized.get(data.tokenizer, 0)
        if vocab > model.vocab_size:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} is smaller than the {data.tokenizer} "
                f"tokenizer's vocabulary ({vocab})"
            )
        mesh = shd.make_mesh(mesh_shape, devices)
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
