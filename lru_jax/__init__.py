"""lru_jax: recurrent networks, the Linear Recurrent Unit and attention in JAX/Flax."""
