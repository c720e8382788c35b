"""Text generation with a KV cache: prefill, then a jitted loop of one-token steps.

``generate_tokens`` is the jitted core: the (left-padded) prompts fill the cache in
one ``Transformer.decode`` call, then a ``lax.while_loop`` samples one token per
step (greedy, temperature, top-k, top-p) until every row has produced the end of
text or the step budget is spent. Batches are split over the mesh's data axes
like training batches; the parameters keep their training shardings.

``generate`` is the host side: tokenise, left-pad to a bucketed length (a few
compiled shapes), and generate past the model's context window by sliding it: when
the window is full, the last half of the text becomes the next prompt.

    python launch.py --sample --workdir runs/default --prompt "ROMEO:" --max_new_tokens 200
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from polyjax import sharding as shd
from polyjax.model import init_cache
from polyjax.restore import Run, batch_multiple, load_run

Array = jax.Array

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. ``temperature`` 0 is greedy (argmax); ``top_k``
    0 and ``top_p`` 1 switch those filters off."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1: off)")


GREEDY = Sampling(temperature=0.0, top_k=0, top_p=1.0)


def sample_logits(logits_BxV: Array, key: Array, sampling: Sampling) -> Array:
    """One token per row: the argmax when greedy, else a draw from the softmax of
    logits / temperature restricted to the top k tokens and then to the smallest
    set of most likely tokens whose probability reaches top_p."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / sampling.temperature
    if sampling.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the likelier ones
        keep_BxV = before_BxV < sampling.top_p  # the first token is always kept
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "sampling", "eos_id"))
def generate_tokens(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_BxP: Array,
    start_B: Array,
    key: Array,
    max_new: Array,
    *,
    steps: int,
    sampling: Sampling,
    eos_id: int,
) -> Array:
    """Up to ``steps`` new tokens per row (B x steps; after a row's end of text, or
    past ``max_new`` (a traced count <= steps), the rest is ``eos_id``).

    ``prompt_BxP`` is left-padded: row b's prompt occupies columns start_B[b]..P-1
    (at least one token). The cache holds P + steps - 1 slots."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_BxP.shape
    cache = init_cache(model.cfg, batch, prompt_len + steps - 1)
    logits_BxPxV, cache = model.decode(prompt_BxP, cache, jnp.int32(0), start_B)
    key, sub = jax.random.split(key)
    token_B = sample_logits(logits_BxPxV[:, -1], sub, sampling)
    out_BxN = jnp.full((batch, steps), eos_id, jnp.int32).at[:, 0].set(token_B)
    done_B = (token_B == eos_id) | (max_new <= 1)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < steps) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, out_BxN, done_B, key = carry
        index = prompt_len + i - 1  # the slot of the token fed in
        logits_Bx1xV, cache = model.decode(token_B[:, None], cache, index, start_B)
        key, sub = jax.random.split(key)
        token_B = jnp.where(done_B, eos_id, sample_logits(logits_Bx1xV[:, 0], sub, sampling))
        out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, token_B[:, None], i, axis=1)
        done_B = done_B | (token_B == eos_id) | (i + 1 >= max_new)
        return i + 1, token_B, cache, out_BxN, done_B, key

    carry = (jnp.int32(1), token_B, cache, out_BxN, done_B, key)
    return jax.lax.while_loop(cond, body, carry)[3]


def bucket(length: int, limit: int) -> int:
    """The padded prompt length: the next power of two >= length (at least
    MIN_BUCKET), at most ``limit``."""
    return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), limit)


def _left_pad(rows: Sequence[Sequence[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(rows), width), pad, np.int32)
    start = np.zeros(len(rows), np.int32)
    for b, row in enumerate(rows):
        row = list(row)[-width:]
        out[b, width - len(row) :] = row
        start[b] = width - len(row)
    return out, start


def generate(
    run: Run,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """The new tokens for each prompt (token lists, each non-empty), at most
    ``max_new_tokens``, ending before the end of text when ``stop_at_eos``.

    The batch is padded to a multiple of the mesh's data-parallel size; prompts
    are left-padded to a power of two (few compiled shapes). The first window keeps
    at most max_seq_len - min(max_new_tokens, max_seq_len / 2) tokens of the prompt
    (its end); a text that outgrows the window slides it: the next window starts
    from the last max_seq_len / 2 tokens, with positions counted from there."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    cfg, eos = run.model_config, run.tokenizer.eos_id
    window = cfg.max_seq_len
    if window < 2:
        raise ValueError(f"max_seq_len={window}: the model's window holds no prompt and token")
    n = len(prompts)
    rows = -(-n // batch_multiple(run.mesh)) * batch_multiple(run.mesh)
    texts = [list(p) for p in prompts] + [list(prompts[0])] * (rows - n)
    new: list[list[int]] = [[] for _ in range(rows)]
    done = np.zeros(rows, bool)
    graphdef, state = nnx.split(nnx.view(run.model, deterministic=True, raise_if_not_found=False))
    sharding = shd.batch_sharding(run.mesh)
    key = jax.random.key(seed)
    # The first window keeps room for min(max_new_tokens, window / 2) new tokens.
    keep = window - min(max_new_tokens, window // 2)
    produced = 0
    while not done[:n].all() and produced < max_new_tokens:
        contexts = [(texts[b] + new[b])[-keep:] for b in range(rows)]
        width = min(bucket(max(len(c) for c in contexts), window), keep)
        steps = window - width
        prompt, start = _left_pad(contexts, width, eos)
        remaining = max_new_tokens - produced
        key, sub = jax.random.split(key)
        out = generate_tokens(
            graphdef,
            state,
            jax.device_put(prompt, sharding),
            jax.device_put(start, NamedSharding(run.mesh, P(shd.BATCH_AXES))),
            sub,
            jnp.int32(min(remaining, steps)),
            steps=steps,
            sampling=sampling,
            eos_id=eos,
        )
        out = np.asarray(jax.device_get(out))[:, : min(remaining, steps)]
        for b in range(rows):
            if done[b]:
                continue
            row = out[b].tolist()
            if stop_at_eos and eos in row:
                row, done[b] = row[: row.index(eos)], True
            new[b] += row
        produced += min(remaining, steps)
        keep = window // 2
    return new[:n]


def main(
    workdir: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """``launch.py --sample``: print ``num_samples`` continuations of ``prompt`` (the
    prompt, then the generated text) from the newest checkpoint of ``workdir``."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    run = load_run(workdir)
    tok = run.tokenizer
    ids = tok.encode(prompt) if prompt else []
    if not ids:
        ids = [tok.eos_id]  # no prompt: start a new document
    outs = generate(run, [ids] * num_samples, max_new_tokens, sampling, seed)
    texts = [prompt + tok.decode(out) for out in outs]
    if jax.process_index() != 0:
        return texts
    for i, text in enumerate(texts):
        if num_samples > 1:
            print(f"--- sample {i + 1} of {num_samples} (step {run.step}, seed {seed})")
        print(text, flush=True)
    return texts
