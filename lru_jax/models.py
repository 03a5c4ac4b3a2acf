"""Task heads over a stack of residual sequence blocks: classifier, regressor, language model.

    inputs -> encoder (Embed for tokens, Dense for floats) -> num_layers x SequenceBlock(mixer)
           -> LayerNorm -> pooling ("none" | "last" | "mean") -> Dense head

Any mixer: "lru", "lstm", "gru" or "simple_rnn". A language model is the "none"-pooling model
over tokens; `generate` samples from it one token at a time through every block's `step`, so
each new token costs one step, not a re-run of the prefix.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import _checks, scan
from lru_jax import nn as lnn

CELLS = ("lru", "lstm", "gru", "simple_rnn")
POOLINGS = ("none", "last", "mean")


class SequenceModel(nn.Module):
    """A deep sequence model with a task head.

    Attributes:
      num_outputs: classes, regression dimensions or vocabulary size of the head.
      vocab_size: token vocabulary of the inputs (Embed encoder), or None for float inputs
        (Dense encoder).
      cell: the mixer of every block: "lru" | "lstm" | "gru" | "simple_rnn".
      d_model: the residual width; recurrent mixers use it as their hidden size.
      d_state: the LRU's state size N.
      pooling: "none" (an output per step), "last" (at each sequence's last valid step) or
        "mean" (over valid steps).
      remat: recompute each block's activations in the backward pass (`nn.remat`) to save
        memory.
      sequence_axis: a mesh axis to split the LRU scans' time over (sequence parallelism;
        "lru" cells only, applied under `jax.set_mesh`), or None.
    """

    num_outputs: int
    vocab_size: int | None = None
    cell: str = "lru"
    d_model: int = 128
    num_layers: int = 2
    d_state: int = 128
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    scan_method: str = "auto"
    norm: str = "layer"
    prenorm: bool = True
    ffn: str = "glu"
    dropout_rate: float = 0.0
    pooling: str = "none"
    remat: bool = False
    sequence_axis: str | None = None

    def setup(self):
        _checks.one_of("cell", self.cell, CELLS)
        if self.sequence_axis is not None and self.cell != "lru":
            raise ValueError(
                f"sequence_axis: sequence parallelism needs cell 'lru', got cell {self.cell!r}"
            )
        _checks.one_of("pooling", self.pooling, POOLINGS)
        if self.vocab_size is None:
            self.encoder = nn.Dense(self.d_model)
        else:
            self.encoder = nn.Embed(self.vocab_size, self.d_model)
        block = nn.remat(lnn.SequenceBlock, static_argnums=(4, 5)) if self.remat else None
        block = block or lnn.SequenceBlock
        self.blocks = [
            block(
                self.d_model,
                self._mixer(),
                norm=self.norm,
                prenorm=self.prenorm,
                ffn=self.ffn,
                dropout_rate=self.dropout_rate,
            )
            for _ in range(self.num_layers)
        ]
        self.final_norm = nn.LayerNorm()
        self.head = nn.Dense(self.num_outputs)

    def _mixer(self) -> nn.Module:
        if self.cell == "lru":
            return lnn.LRU(
                self.d_state,
                self.r_min,
                self.r_max,
                self.max_phase,
                self.scan_method,
                self.sequence_axis,
            )
        return lnn.RecurrentLayer(self.d_model, cell=self.cell)

    def _check_inputs(self, x, name="inputs"):
        if self.vocab_size is None:
            _checks.floating(name, x, allow_complex=False)
        elif not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name}: expected integer token ids, got dtype {x.dtype}")

    def __call__(
        self, x, lengths=None, *, initial_carry=None, return_carry=False, deterministic=True
    ):
        """x: int [batch, time] tokens or float [batch, time, features].

        Returns logits/predictions [batch, time, num_outputs] (pooling "none") or
        [batch, num_outputs]; with `return_carry`, (per-block carries, outputs).
        """
        self._check_inputs(x)
        _checks.rank("inputs", x, 2 if self.vocab_size is not None else 3)
        h = self.encoder(x)
        carries = []
        for i, block in enumerate(self.blocks):
            carry = None if initial_carry is None else initial_carry[i]
            carry, h = block(h, lengths, carry, True, deterministic)
            carries.append(carry)
        h = self.final_norm(h)
        h = self._pool(h, lengths)
        out = self.head(h)
        return (tuple(carries), out) if return_carry else out

    def _pool(self, h, lengths):
        if self.pooling == "none":
            return h
        time = h.shape[1]
        if lengths is None:
            lengths = jnp.full((h.shape[0],), time, jnp.int32)
        if self.pooling == "last":
            return scan.last_valid(jnp.swapaxes(h, 0, 1), lengths, jnp.zeros_like(h[:, 0]))
        mask = jnp.swapaxes(scan.step_mask(lengths, time), 0, 1)[..., None]
        return jnp.sum(h * mask, axis=1) / jnp.maximum(lengths[:, None], 1)

    def initial_carry(self, batch_size: int):
        return tuple(block.initial_carry(batch_size) for block in self.blocks)

    def step(self, carry, x):
        """One step for generation: x int [batch] tokens (or float [batch, features]).

        Returns (carry, logits [batch, num_outputs]). Only for pooling "none".
        """
        if self.pooling != "none":
            raise ValueError(f"step: needs pooling 'none' (a per-step model), got {self.pooling}")
        h = self.encoder(x)
        new = []
        for block, c in zip(self.blocks, carry, strict=True):
            c, h = block.step(c, h)
            new.append(c)
        return tuple(new), self.head(self.final_norm(h))


def sample_logits(key, logits, temperature: float = 1.0, top_k: int = 0):
    """Samples token ids [batch] from logits [batch, vocab]; temperature 0 takes the argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(
    model: SequenceModel,
    variables,
    prompt,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
):
    """Continues token prompts by `length` sampled tokens.

    The prompt runs through the parallel forward once (its final carries are the state after
    it); then each new token costs one `step` of every block, inside one compiled loop.

    Args:
      prompt: int [batch, prompt_len] with prompt_len >= 1.
      length: how many tokens to sample.
      temperature: softmax temperature; 0 means greedy.
      top_k: sample among the k most likely tokens only (0: all).

    Returns:
      int32 numpy [batch, length], the sampled continuation.
    """
    prompt = np.asarray(prompt)
    _checks.rank("prompt", prompt, 2, "[batch, prompt_len]")
    if prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt: expected int tokens [batch, >=1], got {prompt.dtype} {prompt.shape}"
        )
    _checks.positive_int("length", length)
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if not 0 <= top_k <= model.num_outputs:
        raise ValueError(f"top_k: expected 0..{model.num_outputs}, got {top_k}")
    # Prompts are short and of any length: generation never splits time over devices.
    model = model.clone(sequence_axis=None)
    return np.asarray(
        _generate(
            model, variables, jnp.asarray(prompt, jnp.int32), length, temperature, top_k, seed
        )
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate(model, variables, prompt, length, temperature, top_k, seed):
    carry, logits = model.apply(variables, prompt, return_carry=True)

    def one_token(state, key):
        carry, last_logits = state
        token = sample_logits(key, last_logits, temperature, top_k)
        carry, next_logits = model.apply(variables, carry, token, method="step")
        return (carry, next_logits), token

    keys = jax.random.split(jax.random.key(seed), length)  # seed is traced: no recompiles
    _, tokens = jax.lax.scan(one_token, (carry, logits[:, -1]), keys)
    return jnp.swapaxes(tokens, 0, 1).astype(jnp.int32)
