"""Shared defaults: the Wan2.1-I2V-14B DreamZero model on DROID (dreamzero_jax/config.py, where the
package also reads them: a checkpoint's stored config is filled in over them). Other configs override fields.
"""
import ml_collections

from dreamzero_jax.config import DREAMZERO_NEGATIVE_PROMPT, get_base_config  # noqa: F401


def serve_as_trained(c: ml_collections.ConfigDict) -> None:
  """The inference choices of the models trained here from scratch (tiny, Meta-World), where the
  defaults follow the release: the DiT reads the float noise level it was trained at, not its
  integer truncation; observations continue the VAE stream as a training clip is encoded; fresh
  noise per chunk; smoothed actions (the recorded Meta-World results were measured with these)."""
  c.sampler.update(dict(integer_timesteps=False, noise_seed=-1))
  c.postprocess.smooth = True
  c.serve.observation_encode = 'streaming'
