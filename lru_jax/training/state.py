"""The training state: everything a checkpoint must hold to continue exactly."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from lru_jax import nn as lnn
from lru_jax.training.optim import averaged_params


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params; opt_state; model_state: the model's other variable collections
    that persist from step to step, {collection: variables} ({} if none), e.g. "batch_stats"
    (BatchNorm's averages) or "baselines" (a REINFORCE reward baseline). The train step
    updates them (see `steps`), checkpoints save them with the parameters."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any

    @classmethod
    def create(cls, variables, tx):
        """The state at step 0 of `variables` (a model's `init`) and the optimiser `tx`."""
        params = variables["params"]
        transient = ("params", *lnn.TRANSIENT_COLLECTIONS)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state={k: v for k, v in variables.items() if k not in transient},
        )

    def variables(self):
        """The model's variables, for `model.apply`."""
        return {"params": self.params, **self.model_state}

    def for_evaluation(self) -> TrainState:
        """This state with the optimiser's parameter average as its parameters, if it keeps
        one (`train.ema_decay` > 0), else itself: what evaluation, the test and sampling use.
        BatchNorm's averages are still those of training (the loop re-estimates them for
        the average: `steps.recalibrated`)."""
        average = averaged_params(self.opt_state)
        return self if average is None else self.replace(params=average)


# Checkpoints saved before `model_state` existed hold BatchNorm's averages in a top-level
# `batch_stats` field; they restore through this layout.
LEGACY_FIELD = lnn.BATCH_STATS


def legacy_layout(state: TrainState) -> dict:
    """`state` laid out as those checkpoints were: {step, params, opt_state, batch_stats}."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        LEGACY_FIELD: state.model_state.get(LEGACY_FIELD, {}),
    }


def from_legacy_layout(template: TrainState, saved: dict) -> TrainState:
    """The TrainState of a checkpoint restored in `legacy_layout(template)`."""
    batch_stats = saved[LEGACY_FIELD]
    return template.replace(
        step=saved["step"],
        params=saved["params"],
        opt_state=saved["opt_state"],
        model_state={LEGACY_FIELD: batch_stats} if batch_stats else {},
    )
