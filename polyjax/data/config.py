"""DataConfig: what the pipeline reads, how it tokenises and packs; validated on creation."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from polyjax.fields import from_mapping

SOURCE_KINDS = ("shakespeare", "tfds", "text", "jsonl", "arrayrecord", "tokens")
MAX_TOKENIZE_BYTES = 2**28  # 256 MiB: about a minute of tokenising in the trainer
TOKENIZER_KINDS = ("bpe", "byte", "<path to a .model (SentencePiece) or tokenizer.json>")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data stream of one training run.

    source: "shakespeare" | "tfds:<name>[/<config>][#field]" | "text:<glob>" (a document per
      file) | "jsonl:<glob>[#field]" (a document per line) | "arrayrecord:<glob>" (a UTF-8
      document per record) | "tokens:<dir>" (written by `python -m polyjax.data.pretokenize`).
    split: the TFDS split read for training (other sources have one split: "train").
    val_split: the held-out data: a TFDS split name for tfds sources, otherwise a source of
      the same kind (e.g. "jsonl:val/*.jsonl", "tokens:/data/val"). None: hold out
      val_fraction of the documents.
    tokenizer: "bpe" (byte-level BPE trained on the training documents, cached), "byte", or a
      path to a SentencePiece .model or a Hugging Face tokenizer.json. tokens: sources carry
      their own tokenizer: the default accepts it, "byte" or a path must match it.
    document_boundaries: segment ids and positions restart at each document; otherwise the
      packed sequence is one segment with running positions.
    cache_dir: trained tokenizers and tokenised corpora; "" = $POLYJAX_CACHE or
      ~/.cache/polyjax.
    read_threads: Grain reader threads (0 = read in the calling thread).
    max_tokenize_bytes: the largest text source (training + validation, in bytes of its
      files or TFDS split) the trainer tokenises itself; a larger one is refused with the
      `python -m polyjax.data.pretokenize` command to run instead (tokens: sources have no
      bound).
    """

    source: str = "shakespeare"
    split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.05
    tokenizer: str = "bpe"
    vocab_size: int = 1024
    seq_len: int = 256
    global_batch: int = 32
    seed: int = 0
    document_boundaries: bool = False
    cache_dir: str = ""
    tfds_data_dir: str | None = None
    read_threads: int = 0
    max_tokenize_bytes: int = MAX_TOKENIZE_BYTES

    def __post_init__(self):
        kind = self.source.split(":", 1)[0]
        if kind not in SOURCE_KINDS or (kind != "shakespeare" and ":" not in self.source):
            raise ValueError(
                f"source={self.source!r} is not valid: use 'shakespeare' or one of "
                f"{[k + ':...' for k in SOURCE_KINDS[1:]]}"
            )
        if kind != "tfds" and self.split != "train":
            raise ValueError(f"split={self.split!r} applies to tfds sources only; use 'train'")
        if (
            self.val_split is not None
            and kind != "tfds"
            and (kind == "shakespeare" or self.val_split.partition(":")[0] != kind)
        ):
            raise ValueError(
                f"val_split={self.val_split!r} must be a {kind}: source like source "
                "(a split name applies to tfds sources only; shakespeare uses val_fraction)"
            )
        if self.val_split is None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 257 (256 bytes + eos)")
        for name in ("seq_len", "global_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
        if not isinstance(self.max_tokenize_bytes, int) or self.max_tokenize_bytes < 1:
            raise ValueError(
                f"max_tokenize_bytes={self.max_tokenize_bytes!r} must be an integer >= 1"
            )
        if self.read_threads < 0:
            raise ValueError(f"read_threads={self.read_threads} must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        return from_mapping(cls, d, "data")

    def resolved_cache_dir(self) -> pathlib.Path:
        """The cache directory: the field, else $POLYJAX_CACHE, else ~/.cache/polyjax."""
        path = self.cache_dir or os.environ.get("POLYJAX_CACHE") or "~/.cache/polyjax"
        return pathlib.Path(path).expanduser()


def one_line(e: BaseException | str) -> str:
    """An exception's message with its whitespace (newlines included) collapsed."""
    return " ".join(str(e).split())


def check_context(seq_len: int, max_seq_len: int) -> None:
    """Raises if the packed sequences are longer than the model's context."""
    if seq_len > max_seq_len:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context max_seq_len={max_seq_len}; "
            f"set data seq_len <= {max_seq_len}"
        )
