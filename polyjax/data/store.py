"""Token stores: a corpus tokenised once into ArrayRecord shards.

A store is a directory holding meta.json, the tokenizer it was written with (tokenizer.json
or tokenizer.model; none for the byte tokenizer) and shards tokens-NNNNN.array_record.
Shard k holds the documents [k D, (k+1) D) of the corpus (D = meta "shard_docs"): their ids,
each followed by eos, cut into records of `chunk_tokens` ids (the shard's last record
shorter). The store's token stream is the shards in order, so any span is read with a few
record reads and document boundaries are the eos ids. meta.json records each shard's token
count, size and sha256; a store is written by `polyjax.data.pretokenize`."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket

import numpy as np

from polyjax.data import tokenizers
from polyjax.data.config import one_line
from polyjax.data.sources import check_array_record

FORMAT = "polyjax-tokens-v2"
FORMAT_V1 = "polyjax-tokens-v1"  # one global chunking; still read
CHUNK_TOKENS = 8192
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one record
REWRITE = "write it with `python -m polyjax.data.pretokenize --source ... --out {dir}`"


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.array_record"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def temp_name(path: pathlib.Path) -> pathlib.Path:
    """A sibling name unique to this process (host and pid), for write-then-rename."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_json_atomic(path: pathlib.Path, obj) -> None:
    """Writes JSON to a temporary sibling, flushes it to disk and renames it over `path`."""
    tmp = temp_name(path)
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard: documents appended as ids + eos, cut into records of
    `chunk_tokens`. `close()` returns its counts and checksum."""

    def __init__(self, path: pathlib.Path, *, vocab_size: int, eos_id: int, chunk_tokens: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self.dtype = token_dtype(vocab_size)
        self.eos = np.asarray([eos_id], self.dtype)
        self.chunk_tokens = chunk_tokens
        self.counts = {"documents": 0, "tokens": 0, "text_tokens": 0, "records": 0}
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)

    def add(self, ids) -> None:
        """Appends one document (its ids, without eos)."""
        ids = np.asarray(ids, self.dtype)
        self._pending += [ids, self.eos]
        self._pending_len += len(ids) + 1
        self.counts["documents"] += 1
        self.counts["text_tokens"] += len(ids)
        self.counts["tokens"] += len(ids) + 1
        if self._pending_len >= self.chunk_tokens:
            stream = np.concatenate(self._pending)
            full = len(stream) // self.chunk_tokens * self.chunk_tokens
            for lo in range(0, full, self.chunk_tokens):
                self._write(stream[lo : lo + self.chunk_tokens])
            self._pending, self._pending_len = [stream[full:]], len(stream) - full

    def _write(self, tokens: np.ndarray) -> None:
        self._writer.write(tokens.tobytes())
        self.counts["records"] += 1

    def close(self) -> dict:
        if self._pending_len:
            self._write(np.concatenate(self._pending))
        self._writer.close()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        return {**self.counts, "bytes": self.path.stat().st_size, "sha256": file_sha256(self.path)}


def read_meta(directory: pathlib.Path, fix: str) -> dict:
    """meta.json of a store, checked for the keys the reader needs; ValueError (one line,
    naming the file and `fix`) if it is missing, unreadable or not a store's."""
    path = directory / "meta.json"
    if not path.is_file():
        partial = directory.with_name(directory.name + ".partial")
        if partial.is_dir():
            raise ValueError(
                f"{directory} is not a token store yet: {partial} holds an interrupted "
                "pretokenize run; rerun the same pretokenize command to finish it"
            )
        raise ValueError(f"{directory} is not a token store (no meta.json); {fix}")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable or not JSON ({one_line(e)}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_V1):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: format {found!r} is not {FORMAT!r}; {fix}")
    needed = ("dtype", "chunk_tokens", "num_tokens", "vocab_size", "eos_id", "tokenizer")
    missing = [k for k in (*needed, "shards", "fingerprint") if k not in meta]
    shards = meta.get("shards")
    if missing or not isinstance(shards, list) or not shards:
        raise ValueError(f"{path} is incomplete (missing {missing or ['shards']}); {fix}")
    keys = ("file", "records", "tokens") if meta["format"] == FORMAT else ("file", "records")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or any(k not in shard for k in keys):
            raise ValueError(f"{path}: shard entry {i} lacks {list(keys)}; {fix}")
    return meta


def _shard_tokens(meta: dict) -> list[int]:
    """Tokens per shard; a v1 store chunked its whole stream, so only its last shard's
    last record is short."""
    if meta["format"] == FORMAT:
        return [s["tokens"] for s in meta["shards"]]
    sizes = [s["records"] * meta["chunk_tokens"] for s in meta["shards"]]
    sizes[-1] -= sum(sizes) - meta["num_tokens"]
    return sizes


class TokenStore:
    """Random access to the token stream of a store. Opening checks meta.json and that every
    shard is present at its recorded size (stat only); `verify()` checks the checksums.
    Every error is a one-line ValueError naming the path and `fix` (default: rewrite it)."""

    def __init__(self, directory: str | os.PathLike, *, fix: str | None = None):
        import grain

        self.directory = pathlib.Path(directory)
        self.fix = fix or REWRITE.format(dir=self.directory)
        self.meta = read_meta(self.directory, self.fix)
        self.paths = [str(self.directory / s["file"]) for s in self.meta["shards"]]
        for path, shard in zip(self.paths, self.meta["shards"], strict=True):
            if not os.path.isfile(path):
                raise ValueError(f"token store shard {path} is missing; {self.fix}")
            if "bytes" in shard:
                size = os.path.getsize(path)
                if size != shard["bytes"]:
                    raise ValueError(
                        f"token store shard {path} has {size} bytes, meta.json says "
                        f"{shard['bytes']} (truncated or overwritten); {self.fix}"
                    )
            else:  # v1: no recorded size; read the footer
                count = check_array_record(path)
                if count != shard["records"]:
                    raise ValueError(
                        f"token store shard {path} holds {count} records, meta.json says "
                        f"{shard['records']}: corrupt or truncated; {self.fix}"
                    )
        self.dtype = np.dtype(self.meta["dtype"])
        self.chunk = self.meta["chunk_tokens"]
        self.num_tokens = self.meta["num_tokens"]
        self.vocab_size = self.meta["vocab_size"]
        self.eos_id = self.meta["eos_id"]
        self.fingerprint = self.meta["fingerprint"]
        tokens = _shard_tokens(self.meta)
        if sum(tokens) != self.num_tokens:
            raise ValueError(
                f"{self.directory / 'meta.json'}: shard token counts sum to {sum(tokens)}, "
                f"not num_tokens={self.num_tokens}; {self.fix}"
            )
        self._token_starts = np.cumsum([0, *tokens])
        self._record_starts = np.cumsum([0, *(s["records"] for s in self.meta["shards"])])
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return self.num_tokens

    def verify(self) -> None:
        """Re-reads every shard and compares its sha256 with meta.json (v2 stores)."""
        for path, shard in zip(self.paths, self.meta["shards"], strict=True):
            if "sha256" in shard and file_sha256(path) != shard["sha256"]:
                raise ValueError(
                    f"token store shard {path} does not match its checksum in meta.json "
                    f"(corrupt); {self.fix}"
                )

    def _chunk(self, shard: int, r: int) -> np.ndarray:
        """Record r of shard `shard`."""
        index = int(self._record_starts[shard]) + r
        path = self.paths[shard]
        try:
            data = self._records[index]
        except RuntimeError as e:
            raise ValueError(
                f"token store shard {path}: record {r} is corrupt ({one_line(e)}); {self.fix}"
            ) from None
        shard_tokens = int(self._token_starts[shard + 1] - self._token_starts[shard])
        expected = min(self.chunk, shard_tokens - r * self.chunk) * self.dtype.itemsize
        if len(data) != expected:
            raise ValueError(
                f"token store shard {path}: record {r} has {len(data)} bytes, expected "
                f"{expected}; {self.fix}"
            )
        return np.frombuffer(data, self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int32."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"span [{start}, {stop}) outside the stream of {self.num_tokens}")
        parts, pos = [], start
        while pos < stop:
            shard = int(np.searchsorted(self._token_starts, pos, side="right")) - 1
            offset = pos - int(self._token_starts[shard])
            r = offset // self.chunk
            chunk = self._chunk(shard, r)
            lo = offset - r * self.chunk
            take = chunk[lo : lo + stop - pos]
            parts.append(take)
            pos += len(take)
        if not parts:
            return np.zeros(0, np.int32)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.int32)

    def tokenizer(self):
        """The tokenizer the store was written with, checked against meta.json."""
        info = self.meta["tokenizer"]
        file = info.get("file")
        path = self.directory / file if file else None
        tok = tokenizers.load_saved(info.get("kind"), path, fix=self.fix)
        if (tok.vocab_size, tok.eos_id) != (self.vocab_size, self.eos_id):
            raise ValueError(
                f"{path}: vocabulary {tok.vocab_size} / eos {tok.eos_id} do not match "
                f"meta.json ({self.vocab_size} / {self.eos_id}); {self.fix}"
            )
        return tok
