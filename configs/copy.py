"""Copy memory (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016): read 10 symbols, wait
100 blank steps, then write the symbols out after the delimiter.

The memoryless baseline (blank until the delimiter, then a uniform guess among the 8
categories) scores 10 ln(8) / 120 = 0.173 nats per step; the loss counts every step.
"""

from lru_jax.training.config import LONG_RANGE_RING, default_config


def get_config():
    c = default_config()
    c.task = {"name": "copy", "delay": 100, "num_symbols": 10, "num_categories": 8}
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
            "num_steps": 2000,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 1000,
            "eval_batches": 4,
        }
    )
    c.generate.num_samples = 0
    return c
