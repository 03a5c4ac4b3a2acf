"""Moving trained recurrent networks from PyTorch to lru_jax.

`from_torch(torch_module)` turns a `torch.nn.RNN`, `torch.nn.LSTM` or `torch.nn.GRU` into an
equivalent Flax module and its variables. Our cells use PyTorch's gate order, so the weights
are copied transposed, with the two biases of SimpleRNN/LSTM summed (they only ever appear
summed). PyTorch is imported only when this module's functions are called.
"""

from __future__ import annotations

import numpy as np

from lru_jax import nn as lnn

_LAYERS = {
    "RNN_TANH": lambda h: lnn.SimpleRNN(h, activation="tanh"),
    "RNN_RELU": lambda h: lnn.SimpleRNN(h, activation="relu"),
    "LSTM": lambda h: lnn.LSTM(h),
    "GRU": lambda h: lnn.GRU(h),
}


def from_torch(module):
    """Returns `(flax_module, variables)` computing what `module` computes.

    Args:
      module: a `torch.nn.RNN`, `torch.nn.LSTM` or `torch.nn.GRU` with any `num_layers`,
        `bidirectional`, `bias` and `batch_first` (LSTM `proj_size` is not supported).

    Returns:
      A module taking batch-major x [batch, time, input_size], and its variables, such that
      `flax_module.apply(variables, x)` equals the torch module's output in batch-first layout
      (in evaluation mode; inter-layer dropout becomes `Stack(dropout_rate=...)`). The module
      is an `LSTM`/`GRU`/`SimpleRNN` for one unidirectional layer, a `Bidirectional` for one
      bidirectional layer, and a `Stack` of those for several layers.
    """
    mode = getattr(module, "mode", None)
    if mode not in _LAYERS:
        raise TypeError(
            "module: expected a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, "
            f"got {type(module).__name__}"
        )
    if getattr(module, "proj_size", 0):
        raise ValueError(f"module: LSTM proj_size={module.proj_size} is not supported")

    make = _LAYERS[mode]
    layers, params = [], []
    for layer in range(module.num_layers):
        forward = _layer_params(module, layer, "")
        if module.bidirectional:
            layers.append(lnn.Bidirectional(make(module.hidden_size), make(module.hidden_size)))
            backward = _layer_params(module, layer, "_reverse")
            params.append({"forward_layer": forward, "backward_layer": backward})
        else:
            layers.append(make(module.hidden_size))
            params.append(forward)
    if len(layers) == 1:
        return layers[0], {"params": params[0]}
    stack = lnn.Stack(tuple(layers), dropout_rate=float(module.dropout))
    return stack, {"params": {f"layers_{i}": p for i, p in enumerate(params)}}


def _layer_params(module, layer: int, suffix: str) -> dict[str, np.ndarray]:
    """Our parameters for one layer and direction of a torch RNN module."""

    def weight(name):
        return getattr(module, f"{name}_l{layer}{suffix}").detach().cpu().numpy()

    hidden = module.hidden_size
    gates = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}[module.mode]
    zeros = np.zeros(gates * hidden, np.float32)
    b_ih = weight("bias_ih") if module.bias else zeros
    b_hh = weight("bias_hh") if module.bias else zeros
    params = {
        "w_ih": np.ascontiguousarray(weight("weight_ih").T, np.float32),
        "w_hh": np.ascontiguousarray(weight("weight_hh").T, np.float32),
    }
    if module.mode == "GRU":  # b_hn sits inside r * (h W_hn + b_hn): keep the biases apart
        params["b_ih"] = b_ih.astype(np.float32)
        params["b_hh"] = b_hh.astype(np.float32)
    else:
        params["b"] = (b_ih + b_hh).astype(np.float32)
    return params
