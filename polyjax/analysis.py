"""The paper's analyses (section 4.4, appendix C.2): effective rank and layer-wise similarity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def effective_rank(a: Array | np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values.

    With singular values s_i, p_i = s_i / sum_j s_j and erank = exp(-sum_i p_i ln p_i).
    A matrix with k equal non-zero singular values has effective rank k.
    """
    s = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def layer_similarity(
    hidden_NxTxD: Array | np.ndarray, mask_T: np.ndarray | None = None
) -> np.ndarray:
    """Cosine similarity of the hidden states of every pair of layers, averaged over tokens.

    ``hidden_NxTxD`` holds N layers' hidden states for the same T tokens; ``mask_T``
    (optional) selects the tokens to average over. Returns an N x N matrix.
    """
    h = np.asarray(hidden_NxTxD, np.float64)
    if mask_T is not None:
        h = h[:, np.asarray(mask_T, bool)]
    h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    return np.einsum("itd,jtd->ij", h, h) / h.shape[1]


def ffn_weight_ranks(params: dict[str, np.ndarray]) -> dict[str, float]:
    """Effective rank of each named FFN weight matrix (2-D arrays only; per-expert
    stacks of shape (E, a, b) are averaged over experts)."""
    out = {}
    for name, w in params.items():
        w = np.asarray(jnp.asarray(w, jnp.float32))
        if w.ndim == 2:
            out[name] = effective_rank(w)
        elif w.ndim == 3:
            out[name] = float(np.mean([effective_rank(m) for m in w]))
    return out
