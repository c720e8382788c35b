"""Scoring for evaluation: bucketed loglikelihoods against a direct computation from
the model's logits, rolling windows, and lm-evaluation-harness end to end on a
local task (the harness tests skip without the ``eval`` extra)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import evaluate
from polyjax import sharding as shd
from polyjax.data.tokenizers import ByteTokenizer
from polyjax.model import ModelConfig, Transformer
from polyjax.restore import Run

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDTH = 32


@functools.cache
def tiny_run() -> Run:
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=264,
            d_model=32,
            n_layers=2,
            n_heads=4,
            d_ff=64,
            max_seq_len=WIDTH,
            activation=dict(name="polynorm"),
        )
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    return Run(cfg, model, ByteTokenizer(), shd.make_mesh({"data": -1}), 0, {})


@functools.partial(jax.jit, static_argnums=0)
def _logp(graphdef, state, tokens_1xL):
    logits = nnx.merge(graphdef, state)(tokens_1xL)[0][0]
    return jax.nn.log_softmax(logits, axis=-1)


def direct(run: Run, context, continuation):
    """log p(continuation | context) and greedy-ness from one full forward pass of
    the last WIDTH + 1 tokens, in float64 on the host."""
    tokens = (list(context) + list(continuation))[-(WIDTH + 1) :]
    padded = np.zeros((1, WIDTH), np.int32)
    padded[0, : len(tokens) - 1] = tokens[:-1]
    logp = np.asarray(_logp(*nnx.split(run.model), jnp.asarray(padded)), np.float64)
    rows = range(len(tokens) - 1 - len(continuation), len(tokens) - 1)
    total = sum(logp[r, tokens[r + 1]] for r in rows)
    greedy = all(np.argmax(logp[r]) == tokens[r + 1] for r in rows)
    return total, greedy


def test_loglikelihoods_equal_a_direct_computation():
    run = tiny_run()
    rng = np.random.default_rng(0)
    pairs = [
        (rng.integers(0, 257, n).tolist(), rng.integers(0, 257, m).tolist())
        for n, m in [(1, 1), (3, 5), (10, 2), (40, 7), (5, 30), (17, 17), (2, 9), (60, 1), (8, 3)]
    ]
    # A continuation the model greedily produces, to see is_greedy True.
    context = [3, 1, 4, 1, 5]
    logp = np.asarray(_logp(*nnx.split(run.model), jnp.asarray([context + [0] * 27])))
    pairs.append((context, [int(np.argmax(logp[len(context) - 1]))]))
    long = (rng.integers(0, 257, 3).tolist(), rng.integers(0, 257, 45).tolist())
    got = evaluate.loglikelihoods(run, [*pairs, long], batch_size=4)  # 2 batches of 8 rows
    for (c, x), (logp, greedy) in zip(pairs, got[:-1], strict=True):
        want, want_greedy = direct(run, c, x)
        assert logp == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert got[-2][1] is True
    # A continuation longer than the window: the sum over its windows.
    pieces = evaluate.chunks(*long, WIDTH)
    assert [len(x) for _, x in pieces] == [32, 13] and len(pieces[1][0]) == WIDTH + 1 - 13
    assert got[-1][0] == pytest.approx(sum(direct(run, c, x)[0] for c, x in pieces), rel=1e-5)


def test_rolling_windows_score_every_token_once():
    tokens = list(range(100, 171))  # 71 tokens, windows of 16
    pairs = evaluate.rolling_windows(tokens, prefix=7, width=16)
    assert pairs[0] == ([7], tokens[:16])
    scored = [t for _, cont in pairs for t in cont]
    assert scored == tokens
    for context, cont in pairs[1:]:
        full = context + cont
        assert len(full) == 17  # a full window: 16 inputs and one more target
        assert full == tokens[tokens.index(full[0]) : tokens.index(full[0]) + 17]
    assert evaluate.rolling_windows([], 7, 16) == []


def test_rolling_loglikelihood_is_the_sum_over_windows():
    run = tiny_run()
    text = list(np.random.default_rng(1).integers(0, 257, 75))
    [got] = evaluate.rolling_loglikelihoods(run, [text], batch_size=8)
    want = sum(direct(run, c, x)[0] for c, x in evaluate.rolling_windows(text, 256, WIDTH))
    assert got == pytest.approx(want, rel=1e-5)
    short = text[:10]
    [got_short] = evaluate.rolling_loglikelihoods(run, [short], batch_size=8)
    assert got_short == pytest.approx(direct(run, [256], short)[0], rel=1e-5)


def test_bad_requests_are_refused():
    run = tiny_run()
    with pytest.raises(ValueError, match="at least one token"):
        evaluate.loglikelihoods(run, [([1], [])])


# ----------------------------------------------------------------------------
# Through lm-evaluation-harness (the eval extra).


def test_harness_loglikelihood_and_generation_match_the_model():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from polyjax.lm_eval_model import PolyjaxLM

    run = tiny_run()
    lm = PolyjaxLM(run=run, batch_size=8, max_gen_toks=6)
    reqs = [
        Instance("loglikelihood", {}, ("ROMEO: ", "Wherefore"), 0),
        Instance("loglikelihood", {}, ("", "Juliet"), 1),
    ]
    got = lm.loglikelihood(reqs)
    tok = run.tokenizer
    # TemplateLM moves the context's trailing space into the continuation.
    want = [
        direct(run, tok.encode("ROMEO:"), tok.encode(" Wherefore")),
        direct(run, [256], tok.encode("Juliet")),
    ]
    for (logp, greedy), (w, wg) in zip(got, want, strict=True):
        assert logp == pytest.approx(w, rel=1e-5) and greedy == wg
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("O Romeo",), 0)])
    assert rolling == pytest.approx(direct(run, [256], tok.encode("O Romeo"))[0], rel=1e-5)
    # generate_until: greedy by full forward passes, cut at the stop string.
    [text] = lm.generate_until([Instance("generate_until", {}, ("ROMEO:", {"until": ["e"]}), 0)])
    row, out = tok.encode("ROMEO:"), []
    for _ in range(6):
        logits = np.asarray(
            _logp(*nnx.split(run.model), jnp.asarray([row + [0] * (WIDTH - len(row))]))
        )
        token = int(np.argmax(logits[len(row) - 1]))
        if token == tok.eos_id:
            break
        out.append(token)
        row.append(token)
    assert text == tok.decode(out).split("e")[0]


def test_local_tasks_run_through_the_harness(tmp_path):
    pytest.importorskip("lm_eval")
    from polyjax import lm_eval_model

    run = tiny_run()
    lm = lm_eval_model.PolyjaxLM(run=run, batch_size=8)
    results = lm_eval_model.main(
        str(tmp_path), "shakespeare_word_order,shakespeare_next_line", limit=6, lm=lm
    )
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "shakespeare_word_order" in (tmp_path / "eval" / "results.md").read_text()
    for task in lm_eval_model.LOCAL_TASKS:
        # The harness's accuracy equals the one computed here from the model's logits.
        items = [
            json.loads(line)
            for line in (tmp_path / "eval" / "tasks" / f"{task}.jsonl").read_text().splitlines()
        ][:6]
        correct = 0
        for item in items:
            context = item["context"]
            spaces = len(context) - len(context.rstrip())
            head, tail = context[: len(context) - spaces], context[len(context) - spaces :]
            scores = []
            for choice in item["choices"]:
                whole = run.tokenizer.encode(head + tail + choice)
                n = len(run.tokenizer.encode(head))
                scores.append(direct(run, whole[:n], whole[n:])[0])
            correct += int(np.argmax(scores) == item["label"])
        acc = results["results"][task]["acc,none"]
        assert acc == pytest.approx(correct / 6)
        assert written["results"][task]["acc,none"] == acc
        assert written["n-samples"][task]["effective"] == 6
