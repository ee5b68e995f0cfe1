"""dreamzero-jax: the DreamZero World Action Model in JAX."""
