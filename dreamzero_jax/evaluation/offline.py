"""Offline metrics on held-out clips: action error and predicted-video PSNR for the first chunk.

For each clip of the evaluation pipeline (unaugmented, in order) the policy starts from the clip's
first frame, state and instruction and predicts chunk 0. Action error is the MSE in the
normalised action space over the clip's action mask; video PSNR compares the predicted latents of
the chunk with the real chunk's latents, both decoded by the same VAE (so the VAE's own
reconstruction error does not count), in [-1, 1] pixel units (peak-to-peak 2).
"""
from __future__ import annotations

import numpy as np

from dreamzero_jax.datasets import normalization


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return float('inf') if mse == 0 else 10.0 * np.log10(4.0 / mse)


def evaluate(policy, batches, max_clips: int) -> dict:
  cfg = policy.settings
  ha, lf = cfg.video.action_horizon, policy.lf
  e = policy.embodiment
  errors, psnrs = [], []
  for batch in batches:
    for b in range(len(batch['instruction'])):
      if len(errors) >= max_clips:
        break
      instruction = batch['instruction'][b]
      instruction = instruction.decode() if isinstance(instruction, bytes) else str(instruction)
      state = normalization.unnormalize(batch['state'][b, 0, :e.state_dim], policy.stats['state'])
      ep = policy.reset(instruction, batch['video'][b, 0], state)
      _, video, _, info = policy.step(ep)
      mask = batch['action_mask'][b, :ha]
      if mask.any():
        err = (info['normalised_actions'] - batch['actions'][b, :ha]) ** 2
        errors.append(float(err[mask].mean()))
      real = policy.encode_video(batch['video'][b:b + 1, :1 + cfg.video.frames_per_chunk])[:, 1:1 + lf]
      psnrs.append(psnr(policy.decode_video(video), policy.decode_video(real)))
    if len(errors) >= max_clips:
      break
  return dict(clips=len(psnrs), action_mse=float(np.mean(errors)) if errors else None,
              video_psnr_db=float(np.mean(psnrs)) if psnrs else None)
