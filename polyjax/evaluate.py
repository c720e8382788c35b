"""Scoring text with a restored model, in fixed shapes: what an evaluation harness asks.

- ``loglikelihoods``: log p(continuation | context) summed over the continuation's
  tokens, and whether greedy decoding would have produced it, for many
  (context, continuation) token pairs. Pairs are sorted by length and packed into
  batches of ``batch_size`` rows (a multiple of the mesh's data-parallel size),
  right-padded to a power-of-two length, so the forward pass compiles once per
  length bucket (a handful in all).
- Texts longer than the model's context are scored in windows that predict every
  token exactly once, each conditioned on as many tokens before it as fit
  (``chunks``; ``rolling_windows`` for perplexities).

No lm-evaluation-harness here: ``polyjax.lm_eval_model`` wraps these in its API.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polyjax import sharding as shd
from polyjax.restore import Run, batch_multiple
from polyjax.sample import bucket

Array = jax.Array
Pair = tuple[Sequence[int], Sequence[int]]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(
    graphdef: nnx.GraphDef, state: nnx.State, inputs_BxL: Array, targets_BxL: Array, mask_BxL: Array
) -> tuple[Array, Array]:
    """Per row: the sum of log p(target) over the masked tokens, and whether every
    masked target is the argmax of its logits."""
    model = nnx.merge(graphdef, state)
    logits_BxLxV, _ = model(inputs_BxL)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    target_logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
    logp_B = jnp.sum(jnp.where(mask_BxL, target_logp_BxL, 0.0), axis=-1)
    greedy_B = jnp.all(greedy_BxL | ~mask_BxL, axis=-1)
    return logp_B, greedy_B


def chunks(
    context: Sequence[int], continuation: Sequence[int], width: int
) -> list[tuple[list, list]]:
    """(context, continuation) pairs that each fit a window of ``width`` inputs and
    together score every token of ``continuation`` once: a continuation longer than
    the window is scored in pieces, each conditioned on as many tokens before it as
    fit (contexts are cut from the left)."""
    if not continuation:
        raise ValueError("a continuation must hold at least one token")
    if not context:
        raise ValueError("a context must hold at least one token (e.g. the end-of-text id)")
    tokens = list(context) + list(continuation)
    start, out = len(context), []
    while start < len(tokens):
        end = min(start + width, len(tokens))
        out.append((tokens[max(0, end - width - 1) : start], tokens[start:end]))
        start = end
    return out


def rolling_windows(tokens: Sequence[int], prefix: int, width: int) -> list[tuple[list, list]]:
    """The windows of a perplexity: every token of ``tokens`` scored once, the first
    ones conditioned on ``prefix`` (e.g. the end-of-text id), each later window on as
    many tokens before it as fit (the last window is full, scoring only new tokens)."""
    return chunks([prefix], tokens, width) if len(tokens) else []


def loglikelihoods(
    run: Run, pairs: Sequence[Pair], batch_size: int = 32
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is greedy) for each (context, continuation)
    of token ids, in windows of the model's context (``chunks``)."""
    width = run.model_config.max_seq_len
    multiple = batch_multiple(run.mesh)
    rows = max(multiple, -(-batch_size // multiple) * multiple)
    windows, owner = [], []
    for p, (context, continuation) in enumerate(pairs):
        for c, x in chunks(context, continuation, width):
            windows.append((c + x, len(x)))
            owner.append(p)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    graphdef, state = nnx.split(nnx.view(run.model, deterministic=True, raise_if_not_found=False))
    sharding = shd.batch_sharding(run.mesh)
    logps, greedys = [0.0] * len(pairs), [True] * len(pairs)
    for lo in range(0, len(order), rows):
        idx = order[lo : lo + rows]
        length = bucket(max(len(windows[i][0]) - 1 for i in idx), width)
        inputs = np.zeros((rows, length), np.int32)
        targets = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), bool)
        for r, i in enumerate(idx):
            tokens, n = windows[i]
            inputs[r, : len(tokens) - 1] = tokens[:-1]
            targets[r, : len(tokens) - 1] = tokens[1:]
            mask[r, len(tokens) - 1 - n : len(tokens) - 1] = True
        put = lambda a: jax.device_put(a, sharding)
        logp, greedy = jax.device_get(
            _score_batch(graphdef, state, put(inputs), put(targets), put(mask))
        )
        for r, i in enumerate(idx):
            logps[owner[i]] += float(logp[r])
            greedys[owner[i]] &= bool(greedy[r])
    return list(zip(logps, greedys, strict=True))


def rolling_loglikelihoods(
    run: Run, texts: Sequence[Sequence[int]], batch_size: int = 32
) -> list[float]:
    """log p(text) for each token list, conditioned on the end-of-text token (the
    start of a document in training), over rolling windows of the model's context;
    an empty text scores 0."""
    eos = run.tokenizer.eos_id
    scored = [i for i, t in enumerate(texts) if len(t)]
    results = loglikelihoods(run, [([eos], texts[i]) for i in scored], batch_size)
    sums = [0.0] * len(texts)
    for i, (logp, _) in zip(scored, results, strict=True):
        sums[i] = logp
    return sums
