"""Packing: the token stream cut into windows of seq_len + 1 ids, and batches built from them.

Window k of a stream span is tokens [k (L+1), (k+1)(L+1)): consecutive windows tile the
stream, so no token is repeated and none padded; only the final < L+1 ids of the span, which
fill no window, are left out. Inputs are a window's first L ids, targets its last L."""

from __future__ import annotations

import numpy as np


class Span:
    """Tokens [start, stop) of a store's stream."""

    def __init__(self, store, start: int = 0, stop: int | None = None):
        self.store = store
        self.start = start
        self.stop = len(store) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.store.read(self.start + start, self.start + stop)


class Windows:
    """The packed sequences of a span as a random-access (Grain) data source."""

    def __init__(self, span: Span, seq_len: int):
        self.span = span
        self.width = seq_len + 1
        self.count = len(span) // self.width

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.count:
            raise IndexError(f"window {k} of {self.count}")
        return self.span.read(k * self.width, (k + 1) * self.width)


def split_tail(span: Span, fraction: float, eos_id: int, search: int = 1 << 20) -> int:
    """The offset in `span` where its last `fraction` begins, moved to the start of a
    document (just after an eos within `search` ids forward, else backward)."""
    cut = int(len(span) * (1 - fraction))
    ahead = span.read(cut, min(cut + search, len(span) - 1))
    hits = np.flatnonzero(ahead == eos_id)
    if len(hits):
        return cut + int(hits[0]) + 1
    lo = max(cut - search, 0)
    hits = np.flatnonzero(span.read(lo, cut) == eos_id)
    if not len(hits):
        raise ValueError(
            "val_fraction: no document boundary near the split point of the token stream; "
            "give a val_split"
        )
    return lo + int(hits[-1]) + 1


def segments(tokens_BxW: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1, 2, ... within each row; a document's eos belongs to it) and positions
    (0 at each row start and after each eos)."""
    eos_BxW = tokens_BxW == eos_id
    starts_BxW = np.zeros_like(eos_BxW)
    starts_BxW[:, 0] = True
    starts_BxW[:, 1:] = eos_BxW[:, :-1]
    segment_ids = np.cumsum(starts_BxW, axis=1, dtype=np.int32)
    idx_W = np.arange(tokens_BxW.shape[1], dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(starts_BxW, idx_W, 0), axis=1)
    return segment_ids, (idx_W - last_start).astype(np.int32)


def make_batch(
    windows_BxW: np.ndarray, eos_id: int, document_boundaries: bool, weights_B=None
) -> dict[str, np.ndarray]:
    """The batch dict of the data contract from packed windows; `weights_B` (float, per row)
    masks padding rows, default all ones."""
    windows_BxW = np.asarray(windows_BxW, np.int32)
    B, W = windows_BxW.shape
    inputs, targets = windows_BxW[:, :-1], windows_BxW[:, 1:]
    if document_boundaries:
        segment_ids, positions = segments(inputs, eos_id)
    else:
        segment_ids = np.ones((B, W - 1), np.int32)
        positions = np.broadcast_to(np.arange(W - 1, dtype=np.int32), (B, W - 1)).copy()
    row_w = np.ones(B, np.float32) if weights_B is None else np.asarray(weights_B, np.float32)
    return {
        "inputs": np.ascontiguousarray(inputs),
        "targets": np.ascontiguousarray(targets),
        "segment_ids": segment_ids,
        "positions": positions,
        "weights": np.repeat(row_w[:, None], W - 1, axis=1),
    }
