"""What the config files share: the defaults every config starts from
(``base_config``), the CPU sizes and the single-GPU size, and the
``act=...,size=...`` argument.

A size names a model preset (``polyjax.model.preset``) and its changes to each
section of the config. The dense and MoE files add the paper's "1b".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from polyjax.activations import ffn_width, get_spec
from polyjax.config import TrainConfig
from polyjax.data import DataConfig
from polyjax.model import ModelConfig, preset
from polyjax.optim import OptimConfig

SECTIONS = ("model", "data", "optim", "train", "mesh")
MESH = dict(data=-1, fsdp=1, tensor=1, expert=1)

# the scaling ladder's corpus: `python -m experiments.corpus --out runs/corpus4096 ...`
# (experiments/ladder.py builds it on first use)
LADDER_CORPUS = "runs/corpus4096"
LADDER_EVAL_BATCHES = 64  # 64 x 8 x 256 held-out tokens at every rung: 32 select, 32 report


def ladder_size(d_model: int, steps: int) -> dict:
    """A rung of the scaling ladder (experiments/ladder.py): the cpu size's shape
    (d_model 128, 4 layers, head width 32, FFN 6 x d_model) grown in width and depth
    together (n_layers = n_heads = d_model / 32), on the ladder corpus (the machine's
    Python sources, BPE 4096), batches of 8 x 256 tokens, ``steps`` of them (the
    tokens grow with the parameters), warmup a tenth, cosine to lr / 10, and the same
    held-out batches at every rung."""
    return dict(
        preset="small",
        ffn_base=dict(dense=6 * d_model, moe=3 * d_model),
        model=dict(
            d_model=d_model,
            n_layers=d_model // 32,
            n_heads=d_model // 32,
            vocab_size=4096,
            max_seq_len=256,
        ),
        data=dict(source=f"tokens:{LADDER_CORPUS}/tokens", seq_len=256, global_batch=8),
        optim=dict(lr=3e-3, final_lr=3e-4, warmup_steps=steps // 10),
        train=dict(
            steps=steps,
            log_every=max(steps // 30, 10),
            eval_every=steps // 5,
            eval_batches=LADDER_EVAL_BATCHES,
            checkpoint_every=steps // 4,
            keep_checkpoints=1,
        ),
        mesh=dict(data=-1),
    )


# d_model, steps: the tokens grow as the FLOPs per token (experiments/README.md,
# "The scaling ladder", has each rung's parameters, tokens, FLOPs and minutes)
LADDER = {
    "ladder0": (128, 175),
    "ladder1": (160, 300),
    "ladder2": (192, 470),
    "ladder3": (256, 1000),
}
# The next rung, named but not in the default ladder: about 9.4x rung 3's compute
# (1.2e15 FLOPs), 4-5 hours a run on 2 CPU cores, so an accelerator's (a `--size`
# list that names it: `--size ladder0,ladder1,ladder2,ladder3,ladder4`)
LADDER_NEXT = {
    "ladder4": (384, 3075),
}

SIZES = {
    "tiny": dict(  # seconds: tests and smoke runs
        preset="tiny",
        model=dict(vocab_size=264),  # the byte tokenizer's 257, rounded up to a multiple of 8
        data=dict(source="shakespeare", tokenizer="byte", seq_len=64, global_batch=8),
        optim=dict(lr=1e-3, final_lr=1e-4, warmup_steps=10),
        train=dict(steps=100, log_every=10, eval_every=50, eval_batches=2, checkpoint_every=50),
        mesh=dict(data=-1),
    ),
    "cpu": dict(  # the studies (experiments/): five arms x three seeds in ~30 min on 2 cores
        preset="small",
        model=dict(d_model=128, n_heads=4),
        data=dict(
            source="shakespeare", tokenizer="bpe", vocab_size=1024, seq_len=128, global_batch=16
        ),
        optim=dict(lr=1e-3, final_lr=1e-4, warmup_steps=30),
        train=dict(steps=300, log_every=20, eval_every=50, eval_batches=8, checkpoint_every=300),
        mesh=dict(data=-1),
    ),
    "small": dict(  # minutes
        preset="small",
        model=dict(),
        data=dict(
            source="shakespeare", tokenizer="bpe", vocab_size=1024, seq_len=256, global_batch=32
        ),
        optim=dict(lr=1e-3, final_lr=1e-4, warmup_steps=100),
        train=dict(steps=3000, log_every=50, eval_every=500, eval_batches=8, checkpoint_every=500),
        mesh=dict(data=-1),
    ),
    "gpu": dict(  # one H100: a few minutes per dense arm (experiments/README.md, "GPU scale")
        preset="small",
        # the FFN width of an ungated activation (gated ones get 2/3); MoE: per expert
        # (top-2 of 8 experts: about the dense FFN's active parameters)
        ffn_base=dict(dense=2048, moe=960),
        model=dict(
            d_model=512, n_layers=8, n_heads=8, vocab_size=16384, max_seq_len=512, dtype="bfloat16"
        ),
        # the machine's Python sources and docs, pre-tokenised by
        # `python -m experiments.corpus --out runs/corpus` (about 200 MB of text)
        data=dict(source="tokens:runs/corpus/tokens", seq_len=512, global_batch=64),
        optim=dict(lr=1e-3, final_lr=1e-4, warmup_steps=100),
        train=dict(
            steps=2000, log_every=50, eval_every=200, eval_batches=16, checkpoint_every=2000
        ),
        mesh=dict(data=-1),
    ),
    **{name: ladder_size(d, steps) for name, (d, steps) in (LADDER | LADDER_NEXT).items()},
}


def parse_arg(arg: str, **defaults: str) -> dict[str, str]:
    """``"act=polynorm,size=1b"`` -> ``{"act": "polynorm", "size": "1b"}`` over
    ``defaults``; keys not in ``defaults`` are an error naming the valid ones."""
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"config argument {item!r}: expected key=value with key one of "
                f"{', '.join(defaults)}"
            )
        out[key] = value
    return out


def _section(cls: type, values: Any) -> ml_collections.ConfigDict:
    """A dataclass's fields as a ConfigDict; a field that is None becomes a typed
    placeholder, so that ``--config.<field>=<value>`` can still set it."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        value = getattr(values, field.name)
        options = [a for a in typing.get_args(hints[field.name]) if a is not type(None)]
        union = typing.get_origin(hints[field.name]) in (typing.Union, types.UnionType)
        if value is None and union and len(options) == 1 and options[0] in (int, float, str):
            value = config_dict.placeholder(options[0])
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[field.name] = value
    return ml_collections.ConfigDict(out)


def base_config(name: str, model: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Every section of a run with every field at its default, ``model`` (a dict for
    ``ModelConfig.from_dict``, e.g. from ``polyjax.model.preset``) filled in."""
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.model = _section(ModelConfig, ModelConfig.from_dict(model))
    cfg.data = _section(DataConfig, DataConfig())
    cfg.optim = _section(OptimConfig, OptimConfig())
    cfg.train = _section(TrainConfig, TrainConfig())
    cfg.mesh = dict(MESH)
    return cfg


def family_config(family: str, arg: str, sizes: Mapping[str, dict]) -> ml_collections.ConfigDict:
    """The config of ``configs/<family>.py:act=...,size=...``: the size's model
    preset with activation ``act``, then the size's changes to each section."""
    a = parse_arg(arg, act="polynorm", size="tiny")
    if a["size"] not in sizes:
        raise ValueError(f"size={a['size']!r}: valid sizes are {', '.join(sizes)}")
    size = sizes[a["size"]]
    model = preset(family, size["preset"], a["act"])
    if "ffn_base" in size:  # the size's own FFN width, by the equal-parameter rule
        width = ffn_width(size["ffn_base"][family], get_spec(a["act"]).gated, multiple_of=32)
        model["d_ff" if family == "dense" else "moe"] = (
            width if family == "dense" else {**model["moe"], "d_expert": width}
        )
    cfg = base_config(f"{family}-{a['act']}-{a['size']}", model)
    for section in SECTIONS:
        cfg[section].update(size[section])
    return cfg
