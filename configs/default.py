"""Character-level joke generation with an LRU language model (the default `python train.py`).

The jokes shipped in the `pyjokes` package, modelled byte by byte; a few minutes on a laptop
CPU. Afterwards the model writes a few jokes of its own. Every key and its default:
`lru_jax.training.config.default_config`.
"""

from lru_jax.training.config import default_config


def get_config():
    return default_config()
