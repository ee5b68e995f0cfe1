"""Inference: from observations to robot actions (denoising, post-processing, async execution)."""
