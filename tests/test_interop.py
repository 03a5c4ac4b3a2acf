"""from_torch: PyTorch's nn.RNN/LSTM/GRU and our modules compute the same function."""

import jax
import numpy as np
import pytest
import torch

from lru_jax import nn as lnn
from lru_jax.interop import from_torch


def _torch_output(module, x, lengths=None):
    """The torch module's output in batch-first layout, padded with zeros past `lengths`."""
    xt = torch.from_numpy(x if module.batch_first else x.transpose(1, 0, 2))
    with torch.no_grad():
        if lengths is None:
            y, state = module(xt)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                xt, torch.as_tensor(lengths), batch_first=module.batch_first, enforce_sorted=False
            )
            y, state = module(packed)
            y, _ = torch.nn.utils.rnn.pad_packed_sequence(
                y, batch_first=module.batch_first, total_length=x.shape[1]
            )
    y = y.numpy()
    return (y if module.batch_first else y.transpose(1, 0, 2)), state


CASES = [
    (torch.nn.RNN, {"nonlinearity": "tanh"}),
    (torch.nn.RNN, {"nonlinearity": "relu", "num_layers": 2, "batch_first": True}),
    (torch.nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (torch.nn.LSTM, {"bias": False, "batch_first": True}),
    (torch.nn.GRU, {"num_layers": 3, "bidirectional": True, "batch_first": True}),
    (torch.nn.GRU, {"bias": False}),
]


@pytest.mark.parametrize("cls, kwargs", CASES)
def test_from_torch_matches_torch(cls, kwargs):
    torch.manual_seed(0)
    module = cls(3, 4, dropout=0.0, **kwargs).eval()
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    flax_module, variables = from_torch(module)
    y_ref, _ = _torch_output(module, x)
    np.testing.assert_allclose(np.asarray(flax_module.apply(variables, x)), y_ref, atol=1e-5)


@pytest.mark.parametrize("cls", [torch.nn.LSTM, torch.nn.GRU])
def test_packed_sequences_match_seq_lengths(cls):
    """Bidirectional with padding: torch's packed sequences against our seq_lengths."""
    torch.manual_seed(1)
    module = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = np.random.default_rng(1).normal(size=(3, 6, 3)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    flax_module, variables = from_torch(module)
    carries, y = flax_module.apply(variables, x, lengths, return_carry=True)
    y_ref, state = _torch_output(module, x, lengths)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5)
    # torch's h_n: [layers * directions, batch, hidden]; our carry: per layer (fwd, bwd).
    h_n = (state[0] if cls is torch.nn.LSTM else state).numpy()
    for layer, (fwd, bwd) in enumerate(carries):
        for direction, carry in enumerate((fwd, bwd)):
            h = carry[1] if cls is torch.nn.LSTM else carry
            np.testing.assert_allclose(np.asarray(h), h_n[2 * layer + direction], atol=1e-5)


def test_single_layer_carry_matches_h_n_and_c_n():
    torch.manual_seed(2)
    module = torch.nn.LSTM(3, 5, batch_first=True).eval()
    x = np.random.default_rng(2).normal(size=(2, 7, 3)).astype(np.float32)
    flax_module, variables = from_torch(module)
    assert isinstance(flax_module, lnn.LSTM)
    (c, h), _ = flax_module.apply(variables, x, return_carry=True)
    _, (h_n, c_n) = _torch_output(module, x)
    np.testing.assert_allclose(np.asarray(h), h_n[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c), c_n[0].numpy(), atol=1e-5)


def test_dropout_carried_over_and_rejections():
    module = torch.nn.GRU(3, 4, num_layers=2, dropout=0.25)
    flax_module, variables = from_torch(module)
    assert isinstance(flax_module, lnn.Stack) and flax_module.dropout_rate == 0.25
    x = np.ones((1, 4, 3), np.float32)
    train = flax_module.apply(
        variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    assert not np.allclose(np.asarray(train), np.asarray(flax_module.apply(variables, x)))
    with pytest.raises(ValueError, match="proj_size"):
        from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(TypeError, match="module: expected a torch.nn.RNN"):
        from_torch(torch.nn.Linear(3, 4))
