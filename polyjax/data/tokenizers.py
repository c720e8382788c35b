"""Tokenizers behind one interface: vocab_size, eos_id, encode, decode (+ encode_batch).

Byte-level fallback, byte-level BPE trained with the `tokenizers` library (cached), a
Hugging Face tokenizer.json or a SentencePiece .model given by path."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np

from polyjax.data.config import one_line

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
BPE_MAX_TRAIN_CHARS = 2**28  # BPE is trained on at most the first 256M characters


def _existing(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(
            f"tokenizer file {path} does not exist; set data.tokenizer to an existing "
            "tokenizer.json or SentencePiece .model, 'bpe' or 'byte'"
        )
    return path


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 is the end-of-document token."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte"
    kind = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: pathlib.Path) -> str | None:
        return None


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; special-token text inside documents is
    encoded as plain text, so only the pipeline emits eos."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        self.path = _existing(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:
            raise ValueError(
                f"{self.path} is not a Hugging Face tokenizer.json ({one_line(e)}); give a "
                "tokenizer.json, a SentencePiece .model, 'bpe' or 'byte'"
            ) from None
        self._tok.encode_special_tokens = True
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"tokenizer {self.path} has none of the eos tokens {EOS_CANDIDATES}; "
                "add one as a special token"
            )
        self.eos_id = found[0]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "hf-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: pathlib.Path) -> str:
        shutil.copyfile(self.path, directory / "tokenizer.json")
        return "tokenizer.json"


class SentencePieceTokenizer:
    """A SentencePiece .model file; its eos piece ends documents."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = _existing(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise ValueError(
                f"{self.path} is not a SentencePiece model ({one_line(e)}); give a "
                "SentencePiece .model, a tokenizer.json, 'bpe' or 'byte'"
            ) from None
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {self.path} defines no eos piece (eos_id=-1); "
                "train it with an eos piece (eos_id >= 0)"
            )
        self.vocab_size = self._sp.get_piece_size()
        self.fingerprint = "spm-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i != self.eos_id])

    def save(self, directory: pathlib.Path) -> str:
        shutil.copyfile(self.path, directory / "tokenizer.model")
        return "tokenizer.model"


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def train_bpe(texts: Iterator[str], vocab_size: int, path: pathlib.Path) -> HFTokenizer:
    """Trains a byte-level BPE (all 256 bytes in the alphabet, eos = <|endoftext|>) on `texts`
    and saves it to `path` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        tmp = f.name
    tok.save(tmp)
    os.replace(tmp, path)
    return HFTokenizer(path)


def _prefix(corpus, max_chars: int) -> Iterator[str]:
    seen = 0
    for i in range(len(corpus)):
        if seen >= max_chars:
            return
        text = corpus[i]
        seen += len(text)
        yield text


def _bpe_path(cache_dir: pathlib.Path, vocab_size: int, corpus) -> pathlib.Path:
    return cache_dir / "tokenizers" / f"bpe{vocab_size}-{corpus.fingerprint}.json"


def make_tokenizer(
    spec: str, *, vocab_size: int, corpus=None, cache_dir: pathlib.Path | None = None
) -> Tokenizer:
    """ "byte", "bpe" (trained on `corpus`, a DocumentSource, cached in cache_dir/tokenizers
    keyed by corpus fingerprint and vocab size), or a path (.model = SentencePiece, else
    tokenizer.json). Bad or unwritable files: a one-line ValueError naming the path."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        path = _bpe_path(cache_dir, vocab_size, corpus)
        if path.is_file():
            try:
                return HFTokenizer(path)
            except ValueError as e:
                detail = str(e).partition(" (")[2].rpartition(")")[0]
                raise ValueError(
                    f"cached BPE tokenizer {path} is corrupt ({detail}); delete it and it is "
                    "retrained on the next run"
                ) from None
        start = time.perf_counter()
        try:
            tok = train_bpe(_prefix(corpus, BPE_MAX_TRAIN_CHARS), vocab_size, path)
        except OSError as e:
            raise ValueError(
                f"cannot write the BPE tokenizer to {path} ({one_line(e)}); set data.cache_dir "
                "(or $POLYJAX_CACHE) to a writable directory"
            ) from None
        elapsed = time.perf_counter() - start
        print(f"trained BPE {vocab_size} in {elapsed:.1f}s -> {path}", file=sys.stderr)
        return tok
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    return HFTokenizer(spec)


def vocab_size_of(spec: str, *, vocab_size: int) -> int:
    """The vocabulary of tokenizer `spec` without tokenising or training anything: 257 for
    "byte", `vocab_size` (the most a trained BPE has) for "bpe", else read from the file."""
    if spec == "byte":
        return ByteTokenizer.vocab_size
    if spec == "bpe":
        return vocab_size
    return make_tokenizer(spec, vocab_size=vocab_size).vocab_size


def load_saved(kind: str | None, path: pathlib.Path | None, *, fix: str) -> Tokenizer:
    """The tokenizer a token store was written with (its meta.json "tokenizer" entry)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("hf", "sentencepiece") or path is None:
        raise ValueError(f"unknown tokenizer kind {kind!r} / file {path} in a store; {fix}")
    try:
        return HFTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)
    except ValueError as e:
        raise ValueError(f"{str(e).partition('; ')[0]}; {fix}") from None
