"""Training: the chunk-wise flow-matching objective, the sharded train step, checkpoints."""
