"""Config files and command-line overrides.

A config file is a Python file with ``get_config(arg: str) -> ConfigDict``; it is
named on the command line as ``path.py`` or ``path.py:arg``. ``arg`` is a comma
list of ``key=value`` (``act=polynorm,size=1b``) that ``parse_arg`` checks.
Overrides are ``dotted.path=value``; the value is parsed to the type of the field
it replaces. Every error here is a one-line ValueError, raised before any compile.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


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


def load(spec: str) -> ConfigDict:
    """The config of ``path.py[:arg]``: its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"--config: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_polyjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {path} defines no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def fields(cfg: ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field as a dotted path."""
    out = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            out += fields(value, path + ".")
        else:
            out.append(path)
    return out


def _unknown(cfg: ConfigDict, path: str) -> ValueError:
    close = difflib.get_close_matches(path, fields(cfg), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "no close match"
    return ValueError(f"unknown config field {path!r}; {hint}")


def parse_value(raw: str, current: Any, path: str) -> Any:
    """Parse ``raw`` to the type of ``current`` (the field's present value)."""
    if isinstance(current, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{path}: expected true or false, got {raw!r}")
    if isinstance(current, int | float):
        kind = type(current)
        try:
            return kind(raw) if kind is float else int(raw)
        except ValueError:
            raise ValueError(f"{path}: expected {kind.__name__}, got {raw!r}") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, tuple | list):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ValueError(f"{path}: expected a Python list/tuple, got {raw!r}") from None
        if not isinstance(value, tuple | list):
            raise ValueError(f"{path}: expected a Python list/tuple, got {raw!r}")
        return type(current)(value)
    if raw.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def override(cfg: ConfigDict, path: str, raw: str) -> None:
    """Set the field ``path`` (dotted) to ``raw`` parsed to the field's type."""
    *parents, leaf = path.split(".")
    node = cfg
    for key in parents:
        if not isinstance(node, ConfigDict) or key not in node:
            raise _unknown(cfg, path)
        node = node[key]
    if not isinstance(node, ConfigDict) or leaf not in node:
        raise _unknown(cfg, path)
    if isinstance(node[leaf], ConfigDict):
        raise ValueError(f"{path} is a section, not a field; set one of its fields")
    value = parse_value(raw, node[leaf], path)
    with cfg.unlocked():
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"{path}: {e}".splitlines()[0]) from None


def split_assignment(text: str, what: str) -> tuple[str, str]:
    """``"a.b=v"`` -> ``("a.b", "v")``."""
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise ValueError(f"{what}: expected field=value, got {text!r}")
    return path, value


def sweep_values(text: str, cfg: ConfigDict) -> tuple[str, list[str]]:
    """``"model.activation.order=1,2,3"`` -> the field and its raw values, checked
    against ``cfg`` (each value must parse)."""
    path, values = split_assignment(text, "--sweep")
    raws = [v for v in values.split(",") if v]
    if not raws:
        raise ValueError(f"--sweep {path}: no values given")
    for raw in raws:
        override(cfg.copy_and_resolve_references(), path, raw)
    return path, raws


MESH_DEFAULT = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}


def base_config(name: str, model: Mapping[str, Any]) -> ConfigDict:
    """Every section of a run with every field at its default, ``model`` (a dict
    for ``ModelConfig.from_dict``, e.g. from ``polyjax.model.preset``) filled in.
    Config files start from this and set what they change."""
    from polyjax.data import DataConfig
    from polyjax.model import ModelConfig
    from polyjax.optim import OptimConfig
    from polyjax.train import TrainConfig

    cfg = ConfigDict()
    cfg.name = name
    cfg.model = dataclasses.asdict(ModelConfig.from_dict(model))
    cfg.data = dataclasses.asdict(DataConfig())
    cfg.optim = dataclasses.asdict(OptimConfig())
    cfg.train = dataclasses.asdict(TrainConfig())
    cfg.mesh = dict(MESH_DEFAULT)
    return cfg


def check_types(cls: type, values: Mapping[str, Any], section: str) -> None:
    """ValueError naming the first field of ``values`` whose value does not have the
    type annotated on the dataclass ``cls`` (an int is a valid float; nested
    dataclasses given as mappings are checked field by field). Unknown fields are
    left to ``cls.from_dict``, which names them."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints:
            _check_type(hints[name], value, f"{section}.{name}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_type(tp: Any, value: Any, path: str) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(option, value, path)
            except ValueError:
                pass
        raise ValueError(f"{path}={value!r}: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return check_types(tp, value, path)
        ok = isinstance(value, tp)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (tuple, list):
        ok = isinstance(value, tuple | list)
    else:
        return
    if not ok:
        raise ValueError(f"{path}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


# The CPU sizes shared by configs/dense.py and configs/moe.py: (model, data, optim,
# train, mesh) changes to the preset and the defaults.
CPU_SIZES = {
    "tiny": (
        dict(vocab_size=264),  # the byte tokenizer's 257, rounded up to a multiple of 8
        dict(source="shakespeare", tokenizer="byte", seq_len=64, global_batch=8),
        dict(lr=1e-3, final_lr=1e-4, warmup_steps=10),
        dict(steps=100, log_every=10, eval_every=50, eval_batches=2, checkpoint_every=50),
        dict(data=-1),
    ),
    "small": (
        dict(),
        dict(source="shakespeare", tokenizer="bpe", vocab_size=1024, seq_len=256, global_batch=32),
        dict(lr=1e-3, final_lr=1e-4, warmup_steps=100),
        dict(steps=3000, log_every=50, eval_every=500, eval_batches=8, checkpoint_every=500),
        dict(data=-1),
    ),
}


def family_config(family: str, arg: str, sizes: Mapping[str, tuple]) -> ConfigDict:
    """The config of ``configs/<family>.py:act=...,size=...``: the model preset, then
    the size's (model, data, optim, train, mesh) changes from ``sizes``."""
    from polyjax.model import preset

    a = parse_arg(arg, act="polynorm", size="tiny")
    if a["size"] not in sizes:
        raise ValueError(f"size={a['size']!r}: valid sizes are {', '.join(sizes)}")
    cfg = base_config(f"{family}-{a['act']}-{a['size']}", preset(family, a["size"], a["act"]))
    for section, changes in zip(
        ("model", "data", "optim", "train", "mesh"), sizes[a["size"]], strict=True
    ):
        cfg[section].update(changes)
    return cfg
