"""Dense Llama-style decoder (the paper's section 4.1).

    --config configs/dense.py:act=polynorm,size=1b

act: any activation of polyjax.activations.REGISTRY (default polynorm).
size: tiny (seconds on a CPU), small (minutes on a CPU) or 1b (the paper: 24
layers, d_model 2048, 250B tokens of 64 x 4096, lr 3e-4 -> 1.5e-5).
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
        # The paper trains on RedPajama-1T (not in TFDS): point data.source at it.
        dict(source="tfds:c4/en", tokenizer="bpe", vocab_size=32000, seq_len=4096, global_batch=64),
        dict(lr=3e-4, final_lr=1.5e-5, warmup_steps=5_913),
        dict(
            steps=953_674, log_every=100, eval_every=5_000, eval_batches=32, checkpoint_every=2_000
        ),
        dict(data=1, fsdp=-1),
    ),
}


def get_config(arg: str = ""):
    a = parse_arg(arg, act="polynorm", size="tiny")
    if a["size"] not in TRAIN:
        raise ValueError(f"size={a['size']!r}: valid sizes are {', '.join(TRAIN)}")
    cfg = base_config(f"dense-{a['act']}-{a['size']}", preset("dense", a["size"], a["act"]))
    model, data, optim, train, mesh = TRAIN[a["size"]]
    cfg.model.update(model)
    cfg.data.update(data)
    cfg.optim.update(optim)
    cfg.train.update(train)
    cfg.mesh.update(mesh)
    return cfg
