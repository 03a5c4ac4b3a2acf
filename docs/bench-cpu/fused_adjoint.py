"""The sequential scan's fwd+bwd with the one-loop adjoint against the two-pass one, side by
side in one process (docs/benchmarks.md, "The one-loop adjoint"):

    python docs/bench-cpu/fused_adjoint.py

Both programs are compiled first (the threshold `scan.FUSED_ADJOINT_MIN_BYTES` set to 0, then
out of reach), then called alternately; the median wall time of each is printed.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from lru_jax import scan

SHAPES = [(4096, 16, 256), (4096, 4, 64), (4096, 1, 64)]  # (time, batch, state)
CALLS = 15


def inputs(time_steps, batch, state):
    """a [state] on a ring of radius 0.99, b [time, batch, state], complex64."""
    k = jax.random.split(jax.random.key(0), 3)
    a = 0.99 * jnp.exp(1j * jax.random.uniform(k[0], (state,)))
    b = jax.random.normal(k[1], (time_steps, batch, state)) + 1j * jax.random.normal(
        k[2], (time_steps, batch, state)
    )
    return a.astype(jnp.complex64), b.astype(jnp.complex64)


def compiled_gradient(a, b, threshold):
    scan.FUSED_ADJOINT_MIN_BYTES = threshold  # read when the program is traced

    def loss(a, b):
        return jnp.sum(scan.linear_scan(a, b, method="sequential").real)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).compile()


def main():
    for shape in SHAPES:
        a, b = inputs(*shape)
        programs = {
            "one loop": compiled_gradient(a, b, 0),
            "two passes": compiled_gradient(a, b, 2**62),
        }
        seconds = {name: [] for name in programs}
        for _ in range(CALLS):
            for name, program in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(program(a, b))
                seconds[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * np.median(s) for name, s in seconds.items()}
        print(
            f"T, B, N = {shape}: one loop {ms['one loop']:.2f} ms, two passes "
            f"{ms['two passes']:.2f} ms, two / one {ms['two passes'] / ms['one loop']:.2f}"
        )


if __name__ == "__main__":
    main()
