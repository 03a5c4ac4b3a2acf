"""lru_jax: recurrent networks, the Linear Recurrent Unit and attention in JAX/Flax.

Modules: `scan` (the linear recurrence), `cells` (functional SimpleRNN/LSTM/GRU), `lru`
(the Linear Recurrent Unit), `attention` (soft and hard attention functions), `nn` (Flax
Linen modules), `interop` (from PyTorch).
"""

from lru_jax import attention, cells, lru, nn, scan
from lru_jax.scan import linear_scan

__version__ = "0.1.0"
__all__ = ["attention", "cells", "linear_scan", "lru", "nn", "scan"]
