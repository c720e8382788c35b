"""Token stores: a corpus tokenised once into ArrayRecord shards.

A store is a directory holding meta.json, the tokenizer it was written with, and shards
tokens-NNNNN.array_record. The token stream is every document's ids followed by eos, cut
into records of `chunk_tokens` ids (the last one shorter), so any span of the stream is read
with one or two record reads and document boundaries are the eos ids."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from polyjax.data import tokenizers
from polyjax.data.sources import check_array_record

FORMAT = "polyjax-tokens-v1"
CHUNK_TOKENS = 8192
SHARD_RECORDS = 2048  # 16M tokens a shard at the default chunk size


class TokenWriter:
    """Appends documents to a new store in `directory` (created; must not exist)."""

    def __init__(self, directory: pathlib.Path, tokenizer, *, chunk_tokens: int = CHUNK_TOKENS):
        self.directory = directory
        self.tokenizer = tokenizer
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)
        self.chunk_tokens = chunk_tokens
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._pending = np.zeros(0, self.dtype)
        self._writer = None
        directory.mkdir(parents=True)

    def add(self, ids) -> None:
        """Appends one document (its ids, without eos)."""
        ids = np.asarray(ids, self.dtype)
        stream = np.concatenate([self._pending, ids, [self.tokenizer.eos_id]]).astype(self.dtype)
        self.num_tokens += len(ids) + 1
        self.num_documents += 1
        full = len(stream) // self.chunk_tokens * self.chunk_tokens
        for lo in range(0, full, self.chunk_tokens):
            self._write_record(stream[lo : lo + self.chunk_tokens])
        self._pending = stream[full:]

    def _write_record(self, tokens: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = f"tokens-{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.shards.append({"file": name, "records": 0})
        self._writer.write(tokens.tobytes())
        self.shards[-1]["records"] += 1
        if self.shards[-1]["records"] == SHARD_RECORDS:
            self._writer.close()
            self._writer = None

    def close(self, **info) -> None:
        """Flushes the last record and writes meta.json (with `info` added)."""
        if len(self._pending):
            self._write_record(self._pending)
        if self._writer is not None:
            self._writer.close()
        meta = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "chunk_tokens": self.chunk_tokens,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
            "tokenizer": {"kind": self.tokenizer.kind, "file": self.tokenizer.save(self.directory)},
            "shards": self.shards,
            **info,
        }
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=1))


def write_store(
    docs, tokenizer, directory: pathlib.Path, *, spec: str, batch_docs: int = 64, **info
) -> TokenStore:
    """Tokenises every document of `docs` (a DocumentSource named by `spec`) into a store at
    `directory`, atomically (a temporary sibling, renamed), with a progress line on stderr."""
    n = len(docs)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = TokenWriter(tmp, tokenizer)
    start = last = time.perf_counter()
    text_tokens = 0
    for lo in range(0, n, batch_docs):
        for ids in tokenizer.encode_batch([docs[i] for i in range(lo, min(lo + batch_docs, n))]):
            writer.add(ids)
            text_tokens += len(ids)
        now = time.perf_counter()
        if now - last > 1.0 or lo + batch_docs >= n:
            last = now
            rate = writer.num_tokens / max(now - start, 1e-9)
            print(
                f"\rtokenised {writer.num_documents}/{n} documents, "
                f"{writer.num_tokens:,} tokens ({rate:,.0f} tokens/s)",
                end="\n" if lo + batch_docs >= n else "",
                file=sys.stderr,
                flush=True,
            )
    if text_tokens == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"the corpus {spec} is empty: its {n} documents hold no text")
    writer.close(fingerprint=f"{tokenizer.fingerprint}-{docs.fingerprint}", source=spec, **info)
    try:
        os.rename(tmp, directory)
    except OSError:  # another process finished the same store first
        shutil.rmtree(tmp)
    return TokenStore(directory)


class TokenStore:
    """Random access to the token stream of a store; checks every shard on opening."""

    def __init__(self, directory: str | os.PathLike):
        import grain

        self.directory = pathlib.Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.directory} is not a token store (no meta.json); write one with "
                "`python -m polyjax.data.pretokenize --source ... --out DIR`"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, not {FORMAT!r}")
        self.paths = [str(self.directory / s["file"]) for s in self.meta["shards"]]
        for path, shard in zip(self.paths, self.meta["shards"], strict=True):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"token store shard {path} is missing")
            count = check_array_record(path)
            if count != shard["records"]:
                raise ValueError(
                    f"token store shard {path} holds {count} records, meta.json says "
                    f"{shard['records']}: the shard is corrupt or truncated"
                )
        self._shard_ends = np.cumsum([s["records"] for s in self.meta["shards"]])
        self._records = grain.sources.ArrayRecordDataSource(self.paths)
        self.dtype = np.dtype(self.meta["dtype"])
        self.chunk = self.meta["chunk_tokens"]
        self.num_tokens = self.meta["num_tokens"]
        self.eos_id = self.meta["eos_id"]
        self.fingerprint = self.meta["fingerprint"]

    def __len__(self) -> int:
        return self.num_tokens

    def _record(self, r: int) -> np.ndarray:
        path = self.paths[int(np.searchsorted(self._shard_ends, r, side="right"))]
        try:
            data = self._records[r]
        except RuntimeError as e:
            raise ValueError(f"token store shard {path}: record {r} is corrupt ({e})") from None
        expected = min(self.chunk, self.num_tokens - r * self.chunk) * self.dtype.itemsize
        if len(data) != expected:
            raise ValueError(
                f"token store shard {path}: record {r} has {len(data)} bytes, expected {expected}"
            )
        return np.frombuffer(data, self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int32."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"span [{start}, {stop}) outside the stream of {self.num_tokens}")
        if start == stop:
            return np.zeros(0, np.int32)
        first, last = start // self.chunk, (stop - 1) // self.chunk
        parts = [self._record(r) for r in range(first, last + 1)]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offset = first * self.chunk
        return flat[start - offset : stop - offset].astype(np.int32)

    def tokenizer(self):
        """The tokenizer the store was written with."""
        info = self.meta["tokenizer"]
        if info["kind"] == "byte":
            tok = tokenizers.ByteTokenizer()
        elif info["kind"] == "sentencepiece":
            tok = tokenizers.SentencePieceTokenizer(self.directory / info["file"])
        else:
            tok = tokenizers.HFTokenizer(self.directory / info["file"])
        if (tok.vocab_size, tok.eos_id) != (self.meta["vocab_size"], self.eos_id):
            raise ValueError(f"{self.directory}: the tokenizer file does not match meta.json")
        return tok
