"""A tiny training config shared by the training and sharding tests (and the sharding worker)."""

from lru_jax.training import config as config_lib


def tiny_config(**train):
    """A few steps of a tiny LRU language model on the jokes; `train` overrides train keys."""
    c = config_lib.default_config()
    c.task = {"name": "text", "corpus": "jokes", "seq_len": 24}
    c.model.update({"d_model": 16, "num_layers": 1, "lru": {"d_state": 8}, "dropout_rate": 0.1})
    c.train.update(
        {
            "batch_size": 4,
            "num_steps": 12,
            "warmup_steps": 2,
            "log_every": 2,
            "eval_every": 4,
            "checkpoint_every": 4,
            "eval_batches": 1,
            **train,
        }
    )
    c.generate.num_samples = 0
    return c
