"""The main job (`python launch.py`): a small PolyNorm decoder on the built-in
Shakespeare corpus with a BPE tokenizer, a few minutes on 2 CPU cores, to a
validation loss well below the unigram baseline."""

from configs.common import base_config
from polyjax.model import preset


def get_config(arg: str = ""):
    cfg = base_config("default", preset("dense", "small", "polynorm"))
    cfg.data.update(
        dict(source="shakespeare", tokenizer="bpe", vocab_size=1024, seq_len=128, global_batch=16)
    )
    cfg.model.update(dict(vocab_size=1024, max_seq_len=128))
    cfg.optim.update(dict(lr=2e-3, final_lr=2e-4, warmup_steps=50))
    cfg.train.update(
        dict(steps=600, log_every=25, eval_every=200, eval_batches=8, checkpoint_every=200)
    )
    return cfg
