"""Host-side action post-processing: model space [-1, 1] -> robot commands (`robot_actions`).

Order: unnormalise (q01/q99), add the anchor state back to the relative dims, optionally smooth
(2x linear upsample, Savitzky-Golay, downsample: the paper's recipe; the release does not), optionally
snap the gripper to two levels (the release's server does not). numpy only: this runs on the host
after the chunk leaves the device. Actions are [..., horizon, action_dim] throughout.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dreamzero_jax.datasets import normalization
from dreamzero_jax.settings import PostprocessSettings


def robot_actions(actions: np.ndarray, anchor_state: np.ndarray, action_stats: dict, action_dim: int,
                  relative_dims: int | Sequence[int], cfg_postprocess: PostprocessSettings) -> np.ndarray:
  """Normalised padded actions [horizon, >= action_dim] -> raw robot actions [horizon, action_dim]:
  unnormalise, absolute relative dims, then `postprocess.smooth` and `postprocess.gripper_dims`."""
  p = cfg_postprocess
  a = normalization.unnormalize(actions[..., :action_dim], action_stats)
  a = relative_to_absolute(a, anchor_state, relative_dims)
  if p.smooth:
    a = smooth_actions(a, p.savgol_window, p.savgol_polyorder)
  if p.gripper_dims:
    a = binarize_dims(a, p.gripper_dims, p.gripper_threshold, p.gripper_low, p.gripper_high)
  return a.astype(np.float32)


def relative_to_absolute(actions: np.ndarray, anchor_state: np.ndarray,
                         relative_dims: int | Sequence[int]) -> np.ndarray:
  """Adds the chunk's anchor state to the relative action dims (an int N: the leading N).

  DROID: the 7 joint targets are trained relative to the joint state at the chunk anchor,
  the gripper is absolute; AgiBot: the 20 position dims, not the base velocity.
  `anchor_state` is raw (unnormalised), [..., state_dim].
  """
  actions = np.array(actions, np.float32)
  anchor_state = np.asarray(anchor_state, np.float32)
  dims = list(range(relative_dims)) if isinstance(relative_dims, int) else [int(d) for d in relative_dims]
  if dims and max(dims) >= min(actions.shape[-1], anchor_state.shape[-1]):
    raise ValueError(f'relative dims {dims}, but actions have {actions.shape[-1]} '
                     f'and the state {anchor_state.shape[-1]}')
  actions[..., dims] += anchor_state[..., None, dims]
  return actions


def savgol_matrix(length: int, window: int, polyorder: int) -> np.ndarray:
  """The [length, length] linear map of a Savitzky-Golay smoother (scipy's mode='interp').

  Interior samples take the centred window's least-squares polynomial at its centre; the first
  and last window // 2 samples take the polynomial fitted to the first / last full window.
  """
  if window % 2 == 0 or window < 1:
    raise ValueError(f'Savitzky-Golay window must be odd and positive, got {window}')
  if polyorder >= window:
    raise ValueError(f'polyorder {polyorder} must be less than the window {window}')
  if window > length:
    raise ValueError(f'Savitzky-Golay window {window} is longer than the signal ({length})')
  half = window // 2
  offsets = np.arange(window, dtype=np.float64)
  vander = offsets[:, None] ** np.arange(polyorder + 1)  # [window, polyorder + 1]
  # fit[j, k]: weight of window sample k in the fitted polynomial evaluated at offset j.
  fit = vander @ np.linalg.pinv(vander)
  out = np.zeros((length, length))
  for t in range(half, length - half):
    out[t, t - half:t + half + 1] = fit[half]
  out[:half, :window] = fit[:half]
  out[length - half:, length - window:] = fit[window - half:]
  return out


def smooth_actions(actions: np.ndarray, window: int, polyorder: int) -> np.ndarray:
  """2x linear upsample along time, Savitzky-Golay, keep the original time points."""
  actions = np.asarray(actions, np.float64)
  horizon = actions.shape[-2]
  # Upsampled sample 2k is original k; 2k + 1 is the midpoint of k and k + 1.
  up = np.empty(actions.shape[:-2] + (2 * horizon - 1, actions.shape[-1]))
  up[..., 0::2, :] = actions
  up[..., 1::2, :] = 0.5 * (actions[..., :-1, :] + actions[..., 1:, :])
  smoothed = np.einsum('ts,...sa->...ta', savgol_matrix(up.shape[-2], window, polyorder), up)
  return smoothed[..., 0::2, :].astype(np.float32)


def binarize_dims(actions: np.ndarray, dims: Sequence[int], threshold: float, low: float,
                  high: float) -> np.ndarray:
  """Snaps the given dims (grippers) to `high` above `threshold`, else to `low` (the release's
  DROID sim client: 1 above 0.5, else 0)."""
  actions = np.array(actions, np.float32)
  dims = list(dims)
  actions[..., dims] = np.where(actions[..., dims] > threshold, high, low)
  return actions
