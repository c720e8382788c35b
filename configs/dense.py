"""Dense Llama-style decoder (the paper's section 4.1).

    --config configs/dense.py:act=polynorm,size=1b

act: any activation of polyjax.activations.REGISTRY (default polynorm).
size: tiny (seconds on a CPU), cpu (the studies' size), small (minutes on a CPU)
or 1b (the paper's: docs/paper_models.md).
"""

from configs import common

SIZES = {
    **common.SIZES,
    "1b": dict(  # 24 layers, d_model 2048; 250B tokens of 64 x 4096; lr 3e-4 -> 1.5e-5
        preset="1b",
        model=dict(),
        # Fill in the two paths: a token store written by `python -m polyjax.data.pretokenize
        # --source ... --out DIR` and the tokenizer it saved beside its shards, whose
        # vocabulary must fit model.vocab_size (docs/data_scale.md).
        data=dict(
            source="tokens:/path/to/tokens",
            tokenizer="/path/to/tokens/tokenizer.json",
            seq_len=4096,
            global_batch=64,
        ),
        optim=dict(lr=3e-4, final_lr=1.5e-5, warmup_steps=5_913),
        train=dict(
            steps=953_674, log_every=100, eval_every=5_000, eval_batches=32, checkpoint_every=2_000
        ),
        mesh=dict(data=1, fsdp=-1),
    ),
}


def get_config(arg: str = ""):
    return common.family_config("dense", arg, SIZES)
