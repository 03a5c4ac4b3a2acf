"""Character-level (byte-level) language modelling of Python source: the top-level modules of
this interpreter's standard library (up to 3 MB, so the text depends on the Python version).

The trivial baseline is the unigram entropy of the training bytes (a model that ignores
context), reported by the task as `baseline` in nats per byte. Afterwards the model writes a
few samples, starting from `generate.prompt`.
"""

from lru_jax.training.config import LONG_RANGE_RING, default_config


def get_config():
    c = default_config()
    c.task.update({"corpus": "stdlib", "seq_len": 128})
    c.model.update(
        {
            "d_model": 128,
            "num_layers": 2,
            "lru": {"d_state": 128, **LONG_RANGE_RING},
            "dropout_rate": 0.0,
            "pooling": "none",
        }
    )
    c.train.update(
        {
            "batch_size": 32,
            "num_steps": 1500,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 500,
            "eval_batches": 8,
        }
    )
    c.generate.update({"num_samples": 3, "length": 200, "prompt": "def "})
    return c
