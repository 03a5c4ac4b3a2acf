"""MNIST-1D (Greydanus & Kobak 2020): classify 40-step 1-D signals into ten digit classes.

5000 generated examples (3600 train / 400 valid / 1000 test). The trivial baseline, a constant
guess, has accuracy 0.1 (the classes are balanced).

The shuffled variant (time steps permuted): configs/mnist1d_shuffled.py, or
`--config.task.shuffled=True`.
"""

import math

from lru_jax.training.config import default_config


def get_config():
    c = default_config()
    c.task = {"name": "mnist1d", "num_samples": 5000, "shuffled": False}
    c.model.update(
        {
            "d_model": 96,
            "num_layers": 2,
            # The full ring (|λ| in [0, 1), any phase), not the long-range one: the digits are
            # 40-step signals of local shapes, which need fast-decaying, fast-turning modes.
            "lru": {"d_state": 96, "r_min": 0.0, "r_max": 1.0, "max_phase": 2 * math.pi},
            "dropout_rate": 0.1,
            "pooling": "mean",
        }
    )
    c.train.update(
        {
            "batch_size": 64,
            "num_steps": 3000,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 1000,
        }
    )
    c.generate.num_samples = 0
    return c
