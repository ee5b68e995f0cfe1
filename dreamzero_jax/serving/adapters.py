"""Per-robot wire formats: a Policy behind the server's PolicyBackend protocol (serving/protocol.py).

A robot's request carries camera streams and its state under its own field names; the adapter
composes the cameras into the training canvas, concatenates the state fields in state order, and
says in its metadata what a request must hold. Normalisation stays in the policy (the server owns
it: clients send raw observations and get raw actions).

  DROID       observation/{exterior_image_1_left, exterior_image_2_left, wrist_image_left},
              observation/joint_position (7,), observation/gripper_position (1,)  (openpi's names;
              the RoboArena protocol's camera names come from the embodiment's camera_aliases)
  Meta-World  observation/<camera> per data.cameras, observation/state (state_dim,); every other
  and more    embodiment sends its state the same way
"""
from __future__ import annotations

import time

import numpy as np

from dreamzero_jax.datasets import canvas
from dreamzero_jax.inference.policy import Policy
from dreamzero_jax.serving import protocol, roboarena

# DROID clients send the arm's joints and the gripper apart (openpi's field names), in state order.
DROID_STATE_FIELDS = {'observation/joint_position': 7, 'observation/gripper_position': 1}


def state_fields(embodiment_name: str, state_dim: int) -> dict[str, int]:
  """Request keys carrying the robot state, in state order, with their widths."""
  if embodiment_name == 'droid':
    return dict(DROID_STATE_FIELDS)
  return {'observation/state': state_dim}


class PolicyServerBackend:
  """Adapts Policy to the server's PolicyBackend protocol; owns canvas building."""

  def __init__(self, policy: Policy):
    self.policy = policy
    data, video, serve = policy.settings.data, policy.settings.video, policy.settings.serve
    self.cameras = [f'observation/{c}' for c in data.cameras]
    self.state_fields = state_fields(data.embodiment, policy.embodiment.state_dim)
    cam_h, cam_w = serve.camera_height, serve.camera_width
    spec = {k: {'shape': [video.frames_per_chunk, cam_h, cam_w, 3], 'dtype': 'uint8'} for k in self.cameras}
    spec.update({k: {'shape': [n], 'dtype': 'float32'} for k, n in self.state_fields.items()})
    e = policy.embodiment
    self._metadata = dict(observation_spec=spec, action_shape=[video.action_horizon, e.action_dim],
                          action_horizon=video.action_horizon, control_hz=data.control_hz,
                          embodiment=e.name, protocol_version=protocol.PROTOCOL_VERSION)
    aliases = e.camera_aliases.get(roboarena.NAME, {})
    if aliases and set(aliases.values()) == set(data.cameras):
      self._metadata[roboarena.NAME] = dict(
          cameras={f'observation/{theirs}': f'observation/{ours}' for theirs, ours in aliases.items()},
          frames_per_call=serve.roboarena_frames)

  @property
  def metadata(self):
    return self._metadata

  def _canvas(self, observation) -> np.ndarray:
    data, video = self.policy.settings.data, self.policy.settings.video
    return canvas.compose_arrays([observation[k] for k in self.cameras], data.canvas_layout,
                                 video.height, video.width, data.augment_crop_scale)

  def _state(self, observation) -> np.ndarray:
    return np.concatenate([np.asarray(observation[k], np.float32).reshape(-1) for k in self.state_fields])

  def new_session(self, prompt, observation):
    return self.policy.reset(prompt, self._canvas(observation)[0], self._state(observation))

  def infer(self, session_state, observation):
    actions, ep, timing, _ = self.infer_with_video(session_state, observation)
    return actions, ep, timing

  def warmup(self) -> None:
    """Runs a first and a later call on blank observations: every jitted piece of the control step
    (start, denoise, observe) is compiled before the server reports ready."""
    def blank(frames):
      return {k: np.zeros([frames, *e['shape'][1:]] if k in self.cameras else e['shape'], e['dtype'])
              for k, e in self._metadata['observation_spec'].items()}
    first = blank(1)
    _, ep, _ = self.infer(self.new_session('warm up', first), first)
    self.infer(ep, blank(self.policy.settings.video.frames_per_chunk))

  def infer_with_video(self, session_state, observation):
    """infer() plus the predicted video latents of the chunk (for evaluation videos)."""
    t0 = time.perf_counter()
    frames = self._canvas(observation)
    t1 = time.perf_counter()
    ep = session_state
    if ep.chunk > 0:  # later calls carry the frames observed while the last chunk ran
      ep = self.policy.observe(ep, frames, self._state(observation))
    t2 = time.perf_counter()
    actions, video, ep, _ = self.policy.step(ep)
    t3 = time.perf_counter()
    return actions, ep, {'canvas': 1e3 * (t1 - t0), 'observe': 1e3 * (t2 - t1), 'denoise': 1e3 * (t3 - t2)}, video
