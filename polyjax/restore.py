"""A trained run, restored from its workdir for inference: config, model, tokenizer.

``load_run(workdir)`` reads the newest intact checkpoint (``polyjax.checkpoint``)
and the run's config, builds the model's parameters directly in their training
shardings on the run's mesh (or the mesh given) and restores only them (not the
optimizer state), and recovers the run's tokenizer. Sampling, evaluation and the
Hugging Face export share it.

The tokenizer is, in order: a ``tokenizer.json`` / ``tokenizer.model`` saved in
the workdir (``python -m polyjax.hf import`` writes one), else the one the data
config names: "byte", a path, the store of a ``tokens:`` source, or the cached
BPE of the training documents (retrained if the cache is gone: the training is
deterministic). A recovered tokenizer must be the one that the checkpoint's data
stream was written with (its fingerprint), or ``load_run`` refuses it.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx

from polyjax import checkpoint as ckpt
from polyjax import sharding as shd
from polyjax.data import DataConfig, sources, store, tokenizers
from polyjax.model import ModelConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class Run(NamedTuple):
    """A restored run: ``model_config``, ``model`` (sharded on ``mesh``), ``tokenizer``,
    the checkpoint's ``step`` and the run's plain ``config``."""

    model_config: ModelConfig
    model: Transformer
    tokenizer: Any
    mesh: jax.sharding.Mesh
    step: int
    config: dict


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model as inference runs it: no remat, and MoE layers dropless (a capacity
    dispatch would make a token's output depend on the other tokens of its batch)."""
    moe = cfg.moe if cfg.moe is None else dataclasses.replace(cfg.moe, dispatch="dropless")
    return dataclasses.replace(cfg, remat="none", moe=moe)


def run_mesh(config: Mapping[str, Any]) -> jax.sharding.Mesh:
    """The run's mesh on this machine's devices; when its fixed axis sizes do not fit
    them, every device on the data axis (with a note on stderr)."""
    shape = dict(config.get("mesh") or {"data": -1})
    try:
        return shd.make_mesh(shape)
    except ValueError as e:
        print(f"note: the run's mesh does not fit here ({e}); using data=-1", file=sys.stderr)
        return shd.make_mesh({"data": -1})


def _restore_params(workdir: pathlib.Path, step: int, abstract: nnx.State) -> nnx.State:
    """The parameters of checkpoint ``step``, restored straight into the shardings
    of ``abstract`` (an abstract parameter state whose leaves carry shardings)."""
    target = {"params": abstract}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.CheckpointManager(ckpt.directory(workdir), item_names=ckpt.ITEMS) as manager:
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
            ),
        )
    return out["state"]["params"]


def _data_fingerprint(workdir: pathlib.Path, step: int) -> str | None:
    """The data stream's fingerprint saved with the checkpoint (it begins with the
    tokenizer's), or None if the checkpoint holds none."""
    with ocp.CheckpointManager(ckpt.directory(workdir), item_names=ckpt.ITEMS) as manager:
        data = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    try:
        return data["data"]["process_states"][0]["stream"]["data"]
    except (KeyError, IndexError, TypeError):
        return None


def run_tokenizer(workdir: str | pathlib.Path, config: Mapping[str, Any]):
    """The run's tokenizer (see the module docstring for where it comes from)."""
    workdir = pathlib.Path(workdir)
    for name in TOKENIZER_FILES:
        if (workdir / name).is_file():
            return tokenizers.make_tokenizer(str(workdir / name), vocab_size=0)
    data = DataConfig.from_dict(config["data"])
    kind, _, rest = data.source.partition(":")
    if kind == "tokens":
        return store.TokenStore(rest).tokenizer()
    if data.tokenizer != "bpe":
        return tokenizers.make_tokenizer(data.tokenizer, vocab_size=data.vocab_size)
    corpus = sources.open_source(data.source, split=data.split, tfds_data_dir=data.tfds_data_dir)
    if data.val_split is None:
        corpus, _ = sources.hold_out(corpus, data.val_fraction)
    return tokenizers.make_tokenizer(
        "bpe", vocab_size=data.vocab_size, corpus=corpus, cache_dir=data.resolved_cache_dir()
    )


def find_step(workdir: str | pathlib.Path, step: int | None = None) -> tuple[int, dict]:
    """(step, config) of the newest intact checkpoint, or of ``step``; ValueError
    (one line) when there is none."""
    if step is None:
        found = ckpt.latest(workdir)  # raises when every checkpoint is torn
        if found is None:
            raise ValueError(
                f"{workdir} holds no checkpoint (train first: python launch.py --workdir {workdir})"
            )
        return found
    config, why = ckpt.check_step(ckpt.directory(workdir) / str(step), step)  # checksummed
    if config is not None:
        return step, config
    good, _ = ckpt.scan(workdir)
    why = why if (ckpt.directory(workdir) / str(step)).is_dir() else "no such step"
    steps = ", ".join(str(s) for s, _ in good) or "none"
    raise ValueError(f"{workdir}: checkpoint {step} is not usable ({why}); intact steps: {steps}")


def load_run(
    workdir: str | pathlib.Path,
    mesh: jax.sharding.Mesh | None = None,
    step: int | None = None,
) -> Run:
    """Restore the run in ``workdir`` for inference (see the module docstring)."""
    workdir = pathlib.Path(workdir)
    step, config = find_step(workdir, step)
    model_cfg = inference_config(ModelConfig.from_dict(config["model"]))
    mesh = run_mesh(config) if mesh is None else mesh
    shd.validate(model_cfg, mesh, global_batch=batch_multiple(mesh))
    tokenizer = run_tokenizer(workdir, config)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size={model_cfg.vocab_size}"
        )
    fingerprint = _data_fingerprint(workdir, step)
    if fingerprint is not None and not fingerprint.startswith(tokenizer.fingerprint):
        raise ValueError(
            f"the tokenizer recovered for {workdir} ({tokenizer.fingerprint}) is not the one its "
            f"data was tokenized with ({fingerprint}); save that tokenizer as "
            f"{workdir / 'tokenizer.json'}"
        )
    shard = shd.ActivationSharding(mesh, shd.DEFAULT_RULES)
    build = lambda: Transformer(model_cfg, rngs=nnx.Rngs(0), shard=shard)
    graphdef, abstract_params, abstract_rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    param_shardings = shd.model_shardings(abstract_params, mesh)
    abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_params,
        param_shardings,
    )
    params = _restore_params(workdir, step, abstract_params)
    # The non-parameter state (RNG streams) is tiny: build it afresh.
    rest = jax.jit(
        lambda: nnx.state(build(), nnx.Not(nnx.Param)),
        out_shardings=shd.model_shardings(abstract_rest, mesh),
    )()
    model = nnx.merge(graphdef, params, rest)
    return Run(model_cfg, model, tokenizer, mesh, step, config)


def batch_multiple(mesh: jax.sharding.Mesh) -> int:
    """The number of data-parallel shards of a batch on ``mesh``: batch sizes must
    be multiples of it."""
    return math.prod(mesh.shape[a] for a in shd.batch_sharding(mesh).spec[0])
