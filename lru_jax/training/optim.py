"""The optimiser: AdamW (or SGD with momentum) on a warmup + cosine schedule with global-norm
clipping, optionally keeping an exponential moving average of the parameters (`ema_decay`).

Parameter groups (as in the LRU paper):
  "recurrent": the LRU's ν, θ, γ and B: learning rate scaled by `lru_lr_factor`, no decay;
  "no_decay":  vectors (biases, norm scales, D) and Mamba's A_log (as in its paper's code): no
               weight decay;
  "default":   every other matrix: weight decay.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

RECURRENT = frozenset({"nu_log", "theta_log", "gamma_log", "B_re", "B_im"})
NO_DECAY = frozenset({"A_log"})  # matrices without weight decay


def param_group(path, leaf) -> str:
    name = getattr(path[-1], "key", str(path[-1]))
    if name in RECURRENT:
        return "recurrent"
    return "no_decay" if leaf.ndim <= 1 or name in NO_DECAY else "default"


def param_groups(params):
    """The group label of every parameter (a pytree of strings like `params`)."""
    return jax.tree_util.tree_map_with_path(param_group, params)


def group_norms(grads) -> dict[str, jax.Array]:
    """{"grad_norm/<group>": global norm of the gradients in that group} for each group present.

    Logged every train step (see `steps.make_train_step`): a group whose norm collapses or
    spikes shows where gradients vanish or explode.
    """
    groups = jax.tree.leaves(param_groups(grads))
    leaves = jax.tree.leaves(grads)
    norms = {}
    for name in sorted(set(groups)):
        squares = [jnp.sum(jnp.square(g)) for g, n in zip(leaves, groups, strict=True) if n == name]
        norms[f"grad_norm/{name}"] = jnp.sqrt(sum(squares))
    return norms


def schedule(train_config) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to lr * min_lr_ratio."""
    c = train_config
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=c.learning_rate,
        warmup_steps=c.warmup_steps,
        decay_steps=max(c.num_steps, c.warmup_steps + 1),
        end_value=c.learning_rate * c.min_lr_ratio,
    )


OPTIMIZERS = ("adamw", "sgd")


def _group_transforms(c, lr, scaled) -> dict[str, optax.GradientTransformation]:
    if c.optimizer == "sgd":  # SGD with momentum 0.9, e.g. to see exploding gradients unmasked
        return {
            "default": optax.chain(
                optax.add_decayed_weights(c.weight_decay), optax.sgd(lr, momentum=0.9)
            ),
            "no_decay": optax.sgd(lr, momentum=0.9),
            "recurrent": optax.sgd(scaled, momentum=0.9),
        }
    return {
        "default": optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=c.weight_decay),
        "no_decay": optax.adam(lr, b1=0.9, b2=0.999),
        "recurrent": optax.adam(scaled, b1=0.9, b2=0.999),
    }


class ParamAverage(NamedTuple):
    """The optimiser state of `average_params`: `average`, a pytree like the parameters."""

    average: Any


def average_params(decay: float) -> optax.GradientTransformation:
    """Polyak averaging: after each update, average <- decay * average + (1 - decay) * params
    (params after the update), starting from the initial parameters, so no debiasing is
    needed. The updates pass unchanged; it must come last in a chain. Evaluation reads the
    average (`averaged_params`): it smooths the step-to-step noise of the final parameters,
    an average over about 1 / (1 - decay) steps."""

    def init(params):
        return ParamAverage(jax.tree.map(jnp.asarray, params))

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        average = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, state.average, new)
        return updates, ParamAverage(average)

    return optax.GradientTransformation(init, update)


def averaged_params(opt_state):
    """The parameter average an `average_params` transformation keeps in `opt_state`, or None
    if the optimiser keeps none."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, ParamAverage))
    averages = [node.average for node in found if isinstance(node, ParamAverage)]
    return averages[0] if averages else None


def make_optimizer(train_config) -> optax.GradientTransformation:
    c = train_config
    lr = schedule(c)

    def scaled(step):
        return lr(step) * c.lru_lr_factor

    chain = [optax.multi_transform(_group_transforms(c, lr, scaled), param_groups)]
    if c.grad_clip_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(c.grad_clip_norm))
    if c.ema_decay > 0:
        chain.append(average_params(c.ema_decay))
    return optax.chain(*chain)
