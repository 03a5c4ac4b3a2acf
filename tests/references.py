"""Independent numpy references shared by several test files."""

import numpy as np


def numpy_lru(p, u, h0=None, reverse=False):
    """Orvieto et al. 2023, eqs. for the LRU, one step at a time in complex128.

    u: [time, batch, H]; returns (y [time, batch, H], h_last [batch, N]).
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    b_norm = (p["B_re"] + 1j * p["B_im"]) * np.exp(p["gamma_log"])[:, None]
    c = p["C_re"] + 1j * p["C_im"]
    time, batch, _ = u.shape
    h = np.zeros((batch, lam.size), complex) if h0 is None else np.asarray(h0, complex)
    y = np.zeros(u.shape)
    for t in range(time - 1, -1, -1) if reverse else range(time):
        h = lam * h + u[t] @ b_norm.T
        y[t] = (h @ c.T).real + p["D"] * u[t]
    return y, h


def first_params_key(key):
    """The key Flax hands a root module's first "params" draw when it is initialised with
    `key`: a module that returns that draw."""
    import flax.linen as nn

    class FirstDraw(nn.Module):
        @nn.compact
        def __call__(self):
            return self.make_rng("params")

    return FirstDraw().init_with_output(key)[0]
