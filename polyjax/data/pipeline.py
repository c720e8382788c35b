"""The training stream: tokenised corpus -> packed windows -> shuffled, per-process, batched
(Grain MapDataset), plus fixed validation batches and the unigram baseline.

Global batch b is the windows at shuffled positions [o + b G, o + (b+1) G) of the endless
stream of epochs (each epoch a new permutation of all windows); process p of P takes the
positions o + p + k P, so the global batches do not depend on P and each host reads only its
rows. The iterator state is the next batch index b and the offset o (0 unless the run
resumed under another global batch): a state saved under batch G resumes under batch G' at
the same stream position, o + b G, cut into batches of G' from there."""

from __future__ import annotations

import functools
import math
import pathlib

import numpy as np

from polyjax.data import build, checks, packing, sources, store, tokenizers
from polyjax.data.config import DataConfig

UNIGRAM_MAX_TOKENS = 2**26  # unigram counts and evaluation read at most this many ids


def _per_process_rows(rows: int, global_batch: int, process_index: int, process_count: int):
    """Global row ids of the local batches: row i of local batch b is global row
    (b * local + i) * P + p."""
    local = global_batch // process_count
    for b in range(math.ceil(rows / global_batch)):
        yield [(b * local + i) * process_count + process_index for i in range(local)]


class TrainIterator:
    """Iterator over training batches with a JSON-able, checkpointable state:
    ``next_batch``, ``offset`` (the stream position of batch 0, in windows) and the
    ``stream`` it belongs to. ``make(offset)`` gives this process's batches from there."""

    # What a state must share with the stream that resumes it (the global batch may change).
    FIXED = ("data", "seq_len", "seed")

    def __init__(self, make, read_threads: int, stream: dict):
        self._make, self._threads, self._stream = make, read_threads, stream
        self._start(0)

    def _start(self, offset: int) -> None:
        import grain

        threads = self._threads
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        self._it = iter(self._make(offset).to_iter_dataset(options))
        self._offset = offset

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return {
            "next_batch": self._it.get_state()["next_index"],
            "offset": self._offset,
            "stream": self._stream,
        }

    def check_state(self, state: dict) -> None:
        """ValueError (one line) unless ``state`` is of this stream (the same data,
        sequence length and seed; any global batch)."""
        saved = state.get("stream", {})
        diff = [k for k in self.FIXED if saved.get(k) != self._stream[k]]
        if diff:
            raise ValueError(
                f"data iterator state is for another stream: {diff} differ "
                f"(saved {[saved.get(k) for k in diff]}, now {[self._stream[k] for k in diff]})"
            )

    def set_state(self, state: dict) -> None:
        """Continue after ``state``: at the same stream position, in batches of this
        iterator's global batch (the state's own or another)."""
        self.check_state(state)
        batch = self._stream["global_batch"]
        saved_batch = state["stream"].get("global_batch", batch)
        window = int(state.get("offset", 0)) + int(state["next_batch"]) * saved_batch
        if window % batch != self._offset:
            self._start(window % batch)
        self._it.set_state({"next_index": window // batch})


class Pipeline:
    """Training and validation windows of one tokenised corpus, for one process."""

    def __init__(
        self,
        tokenizer,
        train: packing.Windows,
        val: packing.Windows,
        *,
        global_batch: int,
        seed: int,
        document_boundaries: bool,
        read_threads: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        fingerprint: str = "",
    ):
        self.tokenizer = tokenizer
        self.train, self.val = train, val
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.read_threads = read_threads
        self.fingerprint = fingerprint
        self._batch_fn = functools.partial(
            packing.make_batch, eos_id=tokenizer.eos_id, document_boundaries=document_boundaries
        )
        self._unigram: float | None = None

    def train_iter(self) -> TrainIterator:
        """An endless iterator over this process's training batches from the start."""
        import grain

        shuffle_seed = int(np.random.SeedSequence(self.seed).generate_state(1)[0])
        ds = grain.MapDataset.source(self.train).shuffle(seed=shuffle_seed).repeat()

        def make(offset: int):
            mine = ds[offset + self.process_index :: self.process_count]
            return mine.batch(self.local_batch, drop_remainder=True).map(self._batch_fn)

        stream = {
            "data": self.fingerprint,
            "seq_len": self.train.width - 1,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }
        return TrainIterator(make, self.read_threads, stream)

    def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """The first `num_batches` validation batches in a fixed order (fewer when the
        validation split runs out); rows past its end are padding with weight 0."""
        batches = []
        for rows in _per_process_rows(
            self.val.count, self.global_batch, self.process_index, self.process_count
        ):
            if len(batches) == num_batches:
                break
            eos_row = np.full(self.val.width, self.tokenizer.eos_id, np.int32)
            windows = [self.val[r] if r < self.val.count else eos_row for r in rows]
            weights = [float(r < self.val.count) for r in rows]
            batches.append(self._batch_fn(np.stack(windows), weights_B=weights))
        return batches

    def unigram_loss(self) -> float:
        """Validation cross-entropy (nats/token, over the targets of all validation
        windows) of the add-one smoothed unigram model of the training tokens."""
        if self._unigram is None:
            span = self.train.span
            counts = np.zeros(self.tokenizer.vocab_size, np.int64)
            stop = min(len(span), UNIGRAM_MAX_TOKENS)
            for lo in range(0, stop, 1 << 22):
                counts += np.bincount(
                    span.read(lo, min(lo + (1 << 22), stop)), minlength=len(counts)
                )
            logp = np.log((counts + 1) / (counts.sum() + len(counts)))
            width = self.val.width
            rows = min(self.val.count, UNIGRAM_MAX_TOKENS // width)
            targets = self.val.span.read(0, rows * width).reshape(rows, width)[:, 1:]
            self._unigram = float(-logp[targets].mean())
        return self._unigram


CACHE_FORMAT = "v2"  # in the cache key: entries of an older store format are rebuilt


def _cached_store(source, tokenizer, cache_dir: pathlib.Path, spec: str) -> store.TokenStore:
    """The store of `source` in the cache, written on first use (and checked in full, its
    size being bounded by max_tokenize_bytes, when reused)."""
    name = f"{CACHE_FORMAT}-{tokenizer.fingerprint}-{source.fingerprint}"
    path = cache_dir / "tokens" / name
    fix = f"{path} is a cache entry: delete it and it is rebuilt on the next run"
    if (path / "meta.json").is_file():
        cached = store.TokenStore(path, fix=fix)
        cached.verify()
        return cached
    build.build_store(source, tokenizer, path, spec=spec, partial=build.private_partial(path))
    return store.TokenStore(path, fix=fix)


def _spans(cfg: DataConfig) -> tuple[object, packing.Span, packing.Span, str]:
    """(tokenizer, train span, validation span, data fingerprint) for a config."""
    kind, _, rest = cfg.source.partition(":")
    if kind == "tokens":
        train_store = store.TokenStore(rest)
        tok = train_store.tokenizer()
        checks.check_store_tokenizer(cfg, tok, rest)
        if cfg.val_split is None:
            span = packing.Span(train_store)
            cut = packing.split_tail(span, cfg.val_fraction, tok.eos_id)
            return (
                tok,
                packing.Span(train_store, 0, cut),
                packing.Span(train_store, cut),
                (f"{train_store.fingerprint}-tail{cfg.val_fraction}"),
            )
        val_store = store.TokenStore(cfg.val_split.partition(":")[2])
        if val_store.tokenizer().fingerprint != tok.fingerprint:
            raise ValueError(
                f"val_split={cfg.val_split!r} was written with another tokenizer than "
                f"source={cfg.source!r}; re-tokenise one with the other's tokenizer"
            )
        return tok, packing.Span(train_store), packing.Span(val_store), train_store.fingerprint

    def open_(spec, split):
        return sources.open_source(spec, split=split, tfds_data_dir=cfg.tfds_data_dir)

    if cfg.val_split is None:
        train_src, val_src = sources.hold_out(open_(cfg.source, cfg.split), cfg.val_fraction)
    elif kind == "tfds":
        train_src, val_src = open_(cfg.source, cfg.split), open_(cfg.source, cfg.val_split)
    else:
        train_src, val_src = open_(cfg.source, "train"), open_(cfg.val_split, "train")
    cache = cfg.resolved_cache_dir()
    tok = tokenizers.make_tokenizer(
        cfg.tokenizer, vocab_size=cfg.vocab_size, corpus=train_src, cache_dir=cache
    )
    train_store = _cached_store(train_src, tok, cache, cfg.source)
    val_store = _cached_store(val_src, tok, cache, cfg.val_split or cfg.source)
    return tok, packing.Span(train_store), packing.Span(val_store), train_store.fingerprint


def make_pipeline(
    cfg: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    max_seq_len: int | None = None,
    model_vocab_size: int | None = None,
) -> Pipeline:
    """Opens the data of `cfg` for one process: first every check that needs no tokenising
    (`checks.validate`: with `model_vocab_size`, the tokenizer's vocabulary against the
    model's), then the tokenizer (a BPE trained on first use) and the token stores
    (tokenised on first use), both cached under cfg.cache_dir; nothing is written elsewhere.
    Every error is a one-line ValueError naming the path or field and the fix."""
    checks.validate(
        cfg,
        model_vocab_size=model_vocab_size,
        max_seq_len=max_seq_len,
        process_index=process_index,
        process_count=process_count,
    )
    tok, train_span, val_span, fingerprint = _spans(cfg)
    train = packing.Windows(train_span, cfg.seq_len)
    val = packing.Windows(val_span, cfg.seq_len)
    checks.check_vocab(tok.vocab_size, model_vocab_size, f"the tokenizer of {cfg.source!r}")
    for name, windows in (("training", train), ("validation", val)):
        if windows.count == 0:
            raise ValueError(
                f"the {name} split holds {len(windows.span)} tokens, fewer than "
                f"seq_len + 1 = {cfg.seq_len + 1}: lower seq_len or add data"
            )
    return Pipeline(
        tok,
        train,
        val,
        global_batch=cfg.global_batch,
        seed=cfg.seed,
        document_boundaries=cfg.document_boundaries,
        read_threads=cfg.read_threads,
        process_index=process_index,
        process_count=process_count,
        fingerprint=fingerprint,
    )
