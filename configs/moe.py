"""OLMoE-style mixture of experts (the paper's section 4.1).

    --config configs/moe.py:act=swiglu,size=tiny

act: any activation of polyjax.activations.REGISTRY (default polynorm).
size: tiny, small, or 1b (OLMoE-1B-7B: 16 layers, 64 experts top-8, 200B tokens
of 1024 x 4096, lr 4e-4, warmup 10.5B tokens).
"""

from polyjax.config import CPU_SIZES, family_config

TRAIN = {
    # size: (model, data, optim, train, mesh) changes to the preset and the defaults
    **CPU_SIZES,
    "1b": (
        dict(),
        # The paper's data is not in TFDS: point data.source at it. The final lr is
        # not given by the paper (10% of the peak here).
        dict(
            source="tfds:c4/en", tokenizer="bpe", vocab_size=50304, seq_len=4096, global_batch=1024
        ),
        dict(lr=4e-4, final_lr=4e-5, warmup_steps=2_503),
        dict(steps=47_684, log_every=20, eval_every=1_000, eval_batches=32, checkpoint_every=500),
        dict(data=1, fsdp=-1),
    ),
}


def get_config(arg: str = ""):
    return family_config("moe", arg, TRAIN)
