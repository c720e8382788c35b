"""OLMoE-style mixture of experts (the paper's section 4.1).

    --config configs/moe.py:act=swiglu,size=tiny

act: any activation of polyjax.activations.REGISTRY (default polynorm).
size: tiny, small, or 1b (OLMoE-1B-7B: 16 layers, 64 experts top-8, 200B tokens
of 1024 x 4096, lr 4e-4, warmup 10.5B tokens).
"""

from polyjax.config import base_config, parse_arg
from polyjax.model import preset

TRAIN = {
    # size: (model, data, optim, train, mesh) changes to the preset and the defaults
    "tiny": (
        dict(vocab_size=264),  # the byte tokenizer's 257, rounded up to a multiple of 8
        dict(source="shakespeare", tokenizer="byte", seq_len=64, global_batch=8),
        dict(lr=1e-3, final_lr=1e-4, warmup_steps=10),
        dict(steps=100, log_every=10, eval_every=50, eval_batches=2, checkpoint_every=50),
        dict(data=-1),
    ),
    "small": (
        dict(),
        dict(source="shakespeare", tokenizer="bpe", vocab_size=1024, seq_len=256, global_batch=32),
        dict(lr=1e-3, final_lr=1e-4, warmup_steps=100),
        dict(steps=3000, log_every=50, eval_every=500, eval_batches=8, checkpoint_every=500),
        dict(data=-1),
    ),
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
    a = parse_arg(arg, act="polynorm", size="tiny")
    if a["size"] not in TRAIN:
        raise ValueError(f"size={a['size']!r}: valid sizes are {', '.join(TRAIN)}")
    cfg = base_config(f"moe-{a['act']}-{a['size']}", preset("moe", a["size"], a["act"]))
    model, data, optim, train, mesh = TRAIN[a["size"]]
    cfg.model.update(model)
    cfg.data.update(data)
    cfg.optim.update(optim)
    cfg.train.update(train)
    cfg.mesh.update(mesh)
    return cfg
