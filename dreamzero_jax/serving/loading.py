"""A served policy from a checkpoint: a train.py workdir or a `python -m dreamzero_jax.convert` output.

From a workdir only the parameters to serve are read (checkpoint.Checkpointer.restore_params: the
`params` item, EMA parameters when training kept them; under LoRA also the frozen base, merged
here; their shapes come from the model alone, nothing of training/): never the optimiser moments, which
are twice the parameters' bytes under AdamW.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from dreamzero_jax import checkpoint, embodiments
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.config import config_from_dict
from dreamzero_jax.datasets import normalization
from dreamzero_jax.inference import rollout
from dreamzero_jax.inference.policy import Policy
from dreamzero_jax.models import encoders as encoders_lib
from dreamzero_jax.models import lora
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.models.weights import release
from dreamzero_jax.serving.adapters import PolicyServerBackend
from dreamzero_jax.settings import Settings


def load_policy(checkpoint_dir: str, settings: Settings | None = None,
                norm_stats_path: str | None = None, mesh: str | None = None) -> Policy:
  """A Policy from a train.py workdir (its newest checkpoint; EMA parameters when present), or from
  a `python -m dreamzero_jax.convert` output (an official release, served as converted).

  `norm_stats_path`: a norm_stats.json (`python -m dreamzero_jax.datasets stats` writes one) or the
  release's statistics (meta/relative_stats_dreamzero.json with its siblings, or a checkpoint's
  metadata.json) used instead of the checkpoint's; required for a converted checkpoint, which carries none.
  `settings`: those to serve with (default: the checkpoint's own config).
  `mesh`: serve.mesh for the served policy (`serve --mesh`), replacing the config's; None keeps it.
  The weights are read onto one device and the Policy places them over its mesh.
  """
  stats = None
  if os.path.isdir(os.path.join(checkpoint_dir, 'checkpoints')):
    ckpt = checkpoint.Checkpointer(checkpoint_dir, async_save=False)
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f'--checkpoint {checkpoint_dir}: holds no checkpoint')
    saved: Settings = settings_lib.from_config(config_from_dict(ckpt.read_config(step)))
    # A config naming init.vae without its digest is checked against the weights under that path.
    settings = saved if settings is None else encoders_lib.with_vae_digest(settings)
    graphdef, served, frozen = _abstract_served(settings)
    params, frozen, saved_stats = ckpt.restore_params(step, served, settings_lib.as_dict(settings), frozen)
    ckpt.close()
    if frozen is not None:
      params = lora.merge_lora(frozen, params, settings.train.lora_alpha, settings.train.lora_rank)
    dit = nnx.merge(graphdef, params)
    stats = saved_stats
    # The row of the embodiment it trained on, and any rows of the conversion it started from.
    rows = {embodiments.get(saved.data.embodiment).id}
    if saved.init.converted and os.path.isdir(saved.init.converted):
      rows |= set(release.read_manifest(saved.init.converted)['embodiment_rows'] or ())
  elif os.path.isfile(os.path.join(checkpoint_dir, 'config.json')):
    if settings is None:
      with open(os.path.join(checkpoint_dir, 'config.json')) as f:
        settings = settings_lib.from_config(config_from_dict(json.load(f)))
    settings = dataclasses.replace(settings, init=dataclasses.replace(settings.init,
                                                                      converted=os.path.abspath(checkpoint_dir)))
    rows = set(release.read_manifest(checkpoint_dir)['embodiment_rows'] or ())
    dit = None   # read once the embodiment row is known to be real
    if not norm_stats_path:
      raise ValueError(f'--checkpoint {checkpoint_dir}: a converted checkpoint carries no normalisation '
                       'statistics: pass --norm_stats (python -m dreamzero_jax.datasets stats writes one)')
  else:
    raise ValueError(f'--checkpoint {checkpoint_dir}: neither a train.py workdir (checkpoints/) nor a '
                     'converted checkpoint (config.json)')
  e = embodiments.get(settings.data.embodiment)
  if e.id not in rows:
    # Its action/state modules would be the random initialisation: refuse rather than serve noise.
    raise ValueError(f'--checkpoint {checkpoint_dir}: embodiment row {e.id} ({e.name}) of the action/state '
                     f'modules was never converted or trained (real rows: {sorted(rows) or "none"}); convert a '
                     'DreamZero checkpoint into that row (convert --embodiment_id) or train on that embodiment')
  if norm_stats_path:  # ours or the release's file; a checkpoint's own were checked when training began
    stats = normalization.read_stats(norm_stats_path, e, settings.video.action_horizon,
                                     settings.data.relative_action_dims)
    normalization.check_stats(stats, e.state_dim, e.action_dim, settings.video.action_horizon,
                              settings.data.relative_action_dims, norm_stats_path)
  if not stats:
    raise ValueError(f'--checkpoint {checkpoint_dir}: the checkpoint carries no normalisation statistics')
  if dit is None:
    dit = encoders_lib.initial_dit(settings)
  return Policy(rollout.with_serve_mesh(settings, mesh), dit, encoders_lib.build_frozen_encoders(settings), stats)


def _abstract_served(settings: Settings):
  """(the DiT's graph, the served tree's shapes, the frozen LoRA base's shapes or None), from the model
  alone: the DiT's parameters, or under LoRA (train.lora_rank > 0) its factors beside the DiT's
  parameters as the frozen base. Placed on this one device, whatever mesh wrote the checkpoint."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_dit(settings.model, rngs=nnx.Rngs(0))))
  params = on_one(state.to_pure_dict())
  if settings.train.lora_rank == 0:
    return graphdef, params, None
  factors = jax.eval_shape(lambda: lora.init_lora(params, settings.train.lora_targets, settings.train.lora_rank,
                                                  jax.random.key(0)))
  return graphdef, on_one(factors), params


def load_backend(checkpoint_dir: str, settings: Settings | None = None,
                 norm_stats_path: str | None = None, mesh: str | None = None) -> PolicyServerBackend:
  """load_policy behind the server's wire format for its embodiment."""
  return PolicyServerBackend(load_policy(checkpoint_dir, settings, norm_stats_path, mesh))

