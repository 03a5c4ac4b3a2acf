"""The adding problem (Hochreiter & Schmidhuber 1997) at T = 1000: regress the sum of the two
marked values. The memoryless baseline (always 1.0) has MSE 1/6 = 0.167.

LSTM instead of the LRU: `--config.model.mixer=lstm`.
"""

from lru_jax.training.config import default_config


def get_config():
    c = default_config()
    c.task = {"name": "adding", "seq_len": 1000}
    c.model.update(
        {
            "d_model": 64,
            "num_layers": 2,
            "lru": {"d_state": 64, "r_min": 0.9, "r_max": 0.999, "max_phase": 0.628},
            "dropout_rate": 0.0,
            "pooling": "last",
        }
    )
    c.train.update(
        {
            "batch_size": 32,
            "num_steps": 1500,
            "learning_rate": 2e-3,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 500,
            "eval_batches": 4,
        }
    )
    c.generate.num_samples = 0
    return c
