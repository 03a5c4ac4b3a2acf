"""Reverse a sequence (seq2seq with attention): 2..10 random symbols out of 10 in, the same
symbols backwards then EOS out, with a bidirectional LRU encoder and an LRU decoder that
attends over the encoder states (`lru_jax.models.EncoderDecoder`).

The baseline is the best loss of a decoder that never reads the source (the entropy of the
targets per step: 2.29 nats for reverse, 1.44 for sort). `sequence_accuracy` counts outputs
right at every step, which is exactly the share greedy step-by-step decoding gets right. Swap
`--config.task.name=sort` to sort instead, `--config.model.seq2seq.attention=none|soft|hard`,
`--config.model.mixer=gru`.
"""

from lru_jax.training.config import default_config


def get_config():
    c = default_config()
    c.task = {"name": "reverse", "num_symbols": 10, "min_length": 2, "max_length": 10}
    c.model.update(
        {
            "d_model": 64,
            "num_layers": 1,
            "lru": {"d_state": 64},
            "dropout_rate": 0.0,
            "seq2seq": {"attention": "soft", "attention_score": "additive"},
        }
    )
    c.train.update(
        {
            "batch_size": 32,
            "num_steps": 1500,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "weight_decay": 0.01,
            "log_every": 100,
            "eval_every": 500,
            "checkpoint_every": 500,
            "eval_batches": 8,
        }
    )
    c.generate.num_samples = 0
    return c
