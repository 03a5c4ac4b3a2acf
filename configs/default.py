"""Character-level joke generation with an LRU language model (the default `python train.py`).

The jokes shipped in the `pyjokes` package (about 21 KB of text), modelled byte by byte; about
two minutes on a 2-core CPU. Afterwards the model writes a few jokes of its own. The corpus is
small: a bigger or longer-trained model memorises the training jokes (train bits per character
falls towards 0.4 while held-out jokes get worse), so this config is regularised and stops early.
Every key and its default: `lru_jax.training.config.default_config`.
"""

from lru_jax.training.config import default_config


def get_config():
    c = default_config()
    c.model.update({"d_model": 96, "dropout_rate": 0.3})
    c.train.update(
        {"num_steps": 600, "weight_decay": 0.1, "eval_every": 200, "checkpoint_every": 200}
    )
    return c
