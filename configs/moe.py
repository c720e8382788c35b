"""OLMoE-style mixture of experts (the paper's section 4.1).

    --config configs/moe.py:act=swiglu,size=tiny

act: any activation of polyjax.activations.REGISTRY (default polynorm).
size: tiny, cpu, small, gpu, or 1b (OLMoE-1B-7B: docs/paper_models.md).
"""

from configs import common

SIZES = {
    **common.SIZES,
    "1b": dict(  # 16 layers, 64 experts top-8; 200B tokens of 1024 x 4096; lr 4e-4
        preset="1b",
        model=dict(),
        # Fill in the two paths: a token store written by `python -m polyjax.data.pretokenize
        # --source ... --out DIR` and the tokenizer it saved beside its shards, whose
        # vocabulary must fit model.vocab_size (docs/data_scale.md).
        # The final lr is not given by the paper (10% of the peak here).
        data=dict(
            source="tokens:/path/to/tokens",
            tokenizer="/path/to/tokens/tokenizer.json",
            seq_len=4096,
            global_batch=1024,
        ),
        # The plan XLA:TPU found fitting (docs/aot.md): experts over 8 devices, the
        # rest FSDP, 16 microbatches of the 4M-token batch. Per v5p chip: 63 GB on
        # v5p-16 (8 chips), 16.5 GB on v5p-64; there grad_accum=4 fits too (35 GB).
        optim=dict(lr=4e-4, final_lr=4e-5, warmup_steps=2_503, grad_accum=16),
        train=dict(
            steps=47_684, log_every=20, eval_every=1_000, eval_batches=32, checkpoint_every=500
        ),
        mesh=dict(data=1, fsdp=-1, expert=8),
    ),
}


def get_config(arg: str = ""):
    return common.family_config("moe", arg, SIZES)
