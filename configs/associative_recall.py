"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): read 8 key-value pairs,
then answer 8 queries (keys, at random later steps of the 64) with their values.

The memoryless baseline, a uniform guess among the 32 values, scores ln(32) = 3.466 nats per
query. Note a weaker shortcut than recall: remembering only WHICH values occurred (a bag of
values, no binding to keys) already scores about 1.93 nats. In this CPU budget no recurrence
gets below that level: the input-gated ones (`--config.model.mixer=mingru`, `rglru`, `mamba`,
...) reach it, the LRU and the S5 stay above it, and only attention (`attention`) binds keys
(docs/results.md). True recall without attention needs longer training or a larger model.
"""

from lru_jax.training.config import LONG_RANGE_RING, default_config


def get_config():
    c = default_config()
    c.task = {
        "name": "associative_recall",
        "num_pairs": 8,
        "num_queries": 8,
        "seq_len": 64,
        "num_keys": 32,
        "num_values": 32,
    }
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
            "num_steps": 10000,
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "eval_every": 2000,
            "checkpoint_every": 2000,
            "eval_batches": 4,
        }
    )
    c.generate.num_samples = 0
    return c
