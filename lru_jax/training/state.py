"""The training state: everything a checkpoint must hold to continue exactly."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params, opt_state and batch_stats (BatchNorm averages; {} if none)."""

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any

    @classmethod
    def create(cls, variables, tx):
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            batch_stats=variables.get("batch_stats", {}),
        )

    def variables(self):
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}
