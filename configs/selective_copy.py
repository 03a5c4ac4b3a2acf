"""Selective copying (Gu & Dao 2023, the Mamba paper): 8 data tokens scattered at random
positions among 128 blank steps; after the delimiter, write them out in order.

Unlike the copy task the spacing varies, so the model must select by content. The loss counts
only the 8 answer steps; the memoryless baseline, a uniform guess among the 8 categories,
scores ln(8) = 2.079 nats there.
"""

from lru_jax.training.config import LONG_RANGE_RING, default_config


def get_config():
    c = default_config()
    c.task = {"name": "selective_copy", "seq_len": 128, "num_tokens": 8, "num_categories": 8}
    c.model.update(
        {
            "d_model": 64,
            "num_layers": 2,
            "lru": {"d_state": 64, **LONG_RANGE_RING},
            "dropout_rate": 0.0,
            "pooling": "none",
        }
    )
    c.train.update(
        {
            "batch_size": 32,
            "num_steps": 4000,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 1000,
            "eval_batches": 4,
        }
    )
    c.generate.num_samples = 0
    return c
