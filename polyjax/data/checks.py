"""The data checks that need no tokenising and write nothing: run before a workdir is
touched or anything compiles. Every failure is a one-line ValueError naming the field or
path and the fix."""

from __future__ import annotations

import dataclasses
import shlex

from polyjax.data import sources, store, tokenizers
from polyjax.data.config import DataConfig, check_context


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the checks learnt: the tokenizer's vocabulary, and the size of the text the
    trainer will tokenise (bytes; None for tokens: stores) or the store's token count."""

    vocab_size: int
    text_bytes: int | None
    store_tokens: int | None


def pretokenize_command(cfg: DataConfig, spec: str, split: str, out: str) -> str:
    """The command that pre-tokenises `spec` as `cfg` would tokenise it."""
    parts = ["python -m polyjax.data.pretokenize", "--source", shlex.quote(spec)]
    if split != "train":
        parts += ["--split", split]
    if cfg.tfds_data_dir:
        parts += ["--tfds_data_dir", shlex.quote(cfg.tfds_data_dir)]
    parts += ["--tokenizer", shlex.quote(cfg.tokenizer)]
    if cfg.tokenizer == "bpe":
        parts += ["--vocab_size", str(cfg.vocab_size)]
    return " ".join([*parts, "--workers 8 --out", out])


def check_vocab(vocab_size: int, model_vocab_size: int | None, what: str) -> None:
    if model_vocab_size is not None and vocab_size > model_vocab_size:
        raise ValueError(
            f"{what} has a vocabulary of {vocab_size} tokens, more than model.vocab_size="
            f"{model_vocab_size}; set model.vocab_size >= {vocab_size}"
        )


def check_store_tokenizer(cfg: DataConfig, tok, directory) -> None:
    """A tokenizer named in the config (not the default "bpe", which takes the store's) must
    be the one the store was written with."""
    if cfg.tokenizer == "bpe":
        return
    asked = tokenizers.make_tokenizer(cfg.tokenizer, vocab_size=cfg.vocab_size)
    if asked.fingerprint != tok.fingerprint:
        saved = getattr(tok, "path", "byte")
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer the store {directory} was "
            f"written with ({saved}); set data.tokenizer to {saved} or re-tokenise the corpus "
            "with yours"
        )


def _check_tokens(cfg: DataConfig, model_vocab_size: int | None) -> Checked:
    path = cfg.source.partition(":")[2]
    train_store = store.TokenStore(path)
    tok = train_store.tokenizer()
    check_store_tokenizer(cfg, tok, path)
    check_vocab(tok.vocab_size, model_vocab_size, f"the tokenizer of the store {path}")
    if cfg.val_split is not None:
        val_path = cfg.val_split.partition(":")[2]
        val_tok = store.TokenStore(val_path).tokenizer()
        if val_tok.fingerprint != tok.fingerprint:
            raise ValueError(
                f"data.val_split store {val_path} was written with another tokenizer than the "
                f"data.source store {path}; re-tokenise one with the other's tokenizer"
            )
    return Checked(tok.vocab_size, None, train_store.num_tokens)


def _check_text(cfg: DataConfig, model_vocab_size: int | None) -> Checked:
    what = f"data.tokenizer={cfg.tokenizer!r}"
    vocab = tokenizers.vocab_size_of(cfg.tokenizer, vocab_size=cfg.vocab_size)
    check_vocab(vocab, model_vocab_size, what + (" (vocab_size)" if cfg.tokenizer == "bpe" else ""))
    kind = cfg.source.partition(":")[0]
    reads = [(cfg.source, cfg.split)]
    if cfg.val_split is not None:
        reads.append((cfg.source, cfg.val_split) if kind == "tfds" else (cfg.val_split, "train"))
    sizes = [
        sources.source_bytes(spec, split=split, tfds_data_dir=cfg.tfds_data_dir)
        for spec, split in reads
    ]
    total = sum(sizes)
    if total > cfg.max_tokenize_bytes:
        (spec, split), *val = reads
        command = pretokenize_command(cfg, spec, split, "DIR")
        then = "data.source=tokens:DIR"
        if val:
            command += " (and the same for the validation data, --out VAL_DIR)"
            then += " and data.val_split=tokens:VAL_DIR"
        bound = cfg.max_tokenize_bytes
        raise ValueError(
            f"data.source={cfg.source!r} is {total / 2**20:,.1f} MiB of text, more than "
            f"data.max_tokenize_bytes={bound} ({bound / 2**20:,.0f} MiB) that the trainer "
            f"tokenises itself; pre-tokenise it once: `{command}`, then set {then} (or raise "
            "data.max_tokenize_bytes)"
        )
    documents = [_document_sizes(spec, split) for spec, split in reads]
    if cfg.tokenizer in TOKENS_AT_MOST_BYTES and None not in documents:
        _check_windows(cfg, *documents)
    return Checked(vocab, total, None)


# Tokenizers whose token count of a document is at most its UTF-8 bytes: exactly so for
# the byte tokenizer, at most for the trained byte-level BPE (each token is >= 1 byte).
TOKENS_AT_MOST_BYTES = ("byte", "bpe")
_SIZES: dict[str, list[int]] = {}  # source fingerprint -> its documents' sizes (checked)


class _Sizes(list):
    fingerprint = "sizes"


def _document_sizes(spec: str, split: str) -> list[int] | None:
    """The UTF-8 size in bytes of each document of a ``text:`` or ``jsonl:`` source,
    every document read as the trainer reads it (so a binary or non-UTF-8 file, or a
    malformed JSON line, is refused here, before anything is tokenised or written);
    None for the other kinds (nothing read). Once per process for unchanged files."""
    if spec.partition(":")[0] not in ("text", "jsonl"):
        return None
    source = sources.open_source(spec, split=split)
    if source.fingerprint not in _SIZES:
        sizes = [len(source[i].encode("utf-8")) for i in range(len(source))]
        _SIZES[source.fingerprint] = sizes
    return _SIZES[source.fingerprint]


def _check_windows(cfg: DataConfig, train: list[int], val: list[int] | None = None) -> None:
    """Each split holds one window (seq_len + 1 tokens: its documents' tokens and an eos
    each), counted exactly for the byte tokenizer and as at most the bytes for BPE."""
    if val is None:
        parts = sources.hold_out(_Sizes(train), cfg.val_fraction)
        train, val = ([part[i] for i in range(len(part))] for part in parts)
    if not any(train) and not any(val):
        raise ValueError(
            f"the corpus {cfg.source} is empty: its {len(train) + len(val)} documents hold "
            "no text; point the source at files with text"
        )
    at_most = "" if cfg.tokenizer == "byte" else "at most "
    for name, sizes in (("training", train), ("validation", val)):
        tokens = sum(sizes) + len(sizes)
        if tokens < cfg.seq_len + 1:
            raise ValueError(
                f"the {name} split of data.source={cfg.source!r} holds {at_most}{tokens} "
                f"tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}: set data.seq_len below "
                f"{tokens} or give more text"
            )


def validate(
    cfg: DataConfig,
    *,
    model_vocab_size: int | None = None,
    max_seq_len: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Checked:
    """Every check of `cfg` that needs no tokenising: the process split, the context, the
    tokenizer (its vocabulary against `model_vocab_size`; a store's tokenizer against the
    one named), the files (present, not all empty), the size bound, a text: or jsonl:
    source's documents (UTF-8 text, JSON lines with the field; one window per split),
    a tokens: store's meta.json and shards. Reads metadata, tokenizer files and (within
    the size bound) the text the trainer will tokenise; writes nothing."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if cfg.global_batch % process_count:
        raise ValueError(
            f"data.global_batch={cfg.global_batch} must be divisible by process_count="
            f"{process_count}"
        )
    if max_seq_len is not None:
        check_context(cfg.seq_len, max_seq_len)
    if cfg.source.startswith("tokens:"):
        return _check_tokens(cfg, model_vocab_size)
    return _check_text(cfg, model_vocab_size)
