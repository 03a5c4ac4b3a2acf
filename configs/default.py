"""Character-level joke generation with an LRU language model (the default `python train.py`).

The jokes shipped in the `pyjokes` package (about 21 KB of text), modelled byte by byte, in
about three minutes on a 2-core CPU; afterwards the model writes a few jokes of its own and
says how many of their words are real words of its training text. A tenth of the jokes is
held out for validation and a fifth for the test.

15 KB of training jokes is too little to learn English from: alone, the model memorises them
(its validation loss rises after 200 steps) and ends above what bz2 needs for the test jokes.
So training starts on English prose that ships with Python (`pydoc`: the paragraphs of its
interactive help) and hands over to the jokes: the share of prose rows falls linearly from all
at step 0 to a third at step 600 (to none at step 900). docs/results.md has the runs behind
this recipe. Every key and its default: `lru_jax.training.config.default_config`.
"""

from lru_jax.training.config import default_config


def get_config():
    c = default_config()
    c.task.update(
        {
            "valid_fraction": 0.1,
            "test_fraction": 0.2,
            "eval_seq_len": 256,  # longer than any joke: each is read whole
            "extra_corpus": "pydoc",
            "extra_fraction": 1.0,
            "extra_steps": 900,
        }
    )
    c.model.update({"d_model": 96, "dropout_rate": 0.1})
    c.train.update(
        {"num_steps": 600, "weight_decay": 0.1, "eval_every": 200, "checkpoint_every": 200}
    )
    return c
