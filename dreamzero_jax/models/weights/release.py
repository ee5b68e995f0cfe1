"""A converted release: the directory `python -m dreamzero_jax.convert` writes, and reading it back.

DIR holds config.json (the config converted for), manifest.json (the components converted and the rows
of the per-embodiment action/state tables a DreamZero checkpoint filled) and params/, an Orbax PyTree
checkpoint {'dit': ..., 'encoders': ...} of the nnx.Param pure dicts, which `load_converted` restores.
Training (the DiT it starts from, the frozen encoders) and serving read releases here; only the
converter writes them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dreamzero_jax import checkpoint
from dreamzero_jax.checkpoint import IncompatibleCheckpointError
from dreamzero_jax.models import clip, umt5, vae
from dreamzero_jax.models.dit import build_dit
from dreamzero_jax.settings import Settings, as_dict

# Component -> (where its parameters live in the output tree, what to call it in messages).
COMPONENTS = {
    'dit': (('dit',), 'the DiT'),
    'vae': (('encoders', 'vae'), 'the VAE'),
    'text': (('encoders', 'text'), 'the umT5 text encoder'),
    'image': (('encoders', 'image'), 'the CLIP image encoder'),
}
# Config fields that change no parameter: a converted checkpoint loads under any value of these.
RUNTIME_FIELDS = ('model.dtype', 'model.scan_layers', 'model.remat_policy', 'model.attention',
                  'model.attention_mask', 'model.inference_state_attention', 'model.seq_pad_multiple',
                  'text_encoder.tokenizer', *checkpoint.EXECUTION_FIELDS)
# The config section each component's parameters depend on (the only ones compared at load).
SECTIONS = {'dit': 'model', 'vae': 'vae', 'text': 'text_encoder', 'image': 'image_encoder'}
MANIFEST = 'manifest.json'


def config_components(settings: Settings) -> tuple[str, ...]:
  """The components a model of these settings has (no CLIP without an image branch)."""
  return ('dit', 'vae', 'text') + (('image',) if settings.model.image_dim else ())


def abstract_params(settings: Settings, components: Iterable[str] | None = None) -> dict[str, dict]:
  """{'dit': ..., 'encoders': {'vae', 'text', 'image'}}: the nnx.Param pure dicts of `components`
  (default: all the config has) as ShapeDtypeStructs (nothing allocated). The encoders are built one
  by one, so an absent component's config is never read."""
  components = set(config_components(settings) if components is None else components)
  shape = lambda make: nnx.state(nnx.eval_shape(make), nnx.Param).to_pure_dict()
  out: dict[str, dict] = {}
  if 'dit' in components:
    out['dit'] = shape(lambda: build_dit(settings.model, rngs=nnx.Rngs(0)))
  makers = {'vae': lambda: vae.WanVAE(settings.vae, rngs=nnx.Rngs(0)),
            'text': lambda: umt5.UMT5Encoder(settings.text_encoder, rngs=nnx.Rngs(0)),
            'image': lambda: clip.CLIPVision(settings.image_encoder, rngs=nnx.Rngs(0))}
  encoders = {name: shape(make) for name, make in makers.items() if name in components}
  if encoders:
    out['encoders'] = encoders
  return out


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  """A nested dict as {path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def read_manifest(directory: str) -> dict:
  """A `convert` output's manifest.json: {'components': [...], 'embodiment_rows': [...]}. Outputs written
  before manifests hold every component and name no rows (None)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return {'components': list(COMPONENTS), 'embodiment_rows': None}
  with open(path) as f:
    return json.load(f)


def load_converted(directory: str, settings: Settings,
                   parts: tuple[str, ...] = ('dit', 'encoders')) -> tuple[dict | None, dict | None]:
  """(DiT params, encoder params) as nnx.Param pure dicts of numpy arrays, from a `convert` output.

  Only `parts` are read (None for the others). Refuses a checkpoint converted for a config whose
  model / vae / text_encoder / image_encoder differ.
  """
  config_path = os.path.join(directory, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{directory} is not a converted checkpoint (no config.json)')
  present = set(read_manifest(directory)['components'])
  wanted = set()
  for part in parts:
    wanted |= {'dit'} if part == 'dit' else set(config_components(settings)) - {'dit'}
  absent = [name for name in COMPONENTS if name in wanted - present]
  if absent:
    raise IncompatibleCheckpointError(
        f'{directory} was converted without {", ".join(COMPONENTS[n][1] for n in absent)} '
        f'({",".join(absent)}): convert a source that holds them '
        f'(python -m dreamzero_jax.convert --components {",".join(absent)} ...)')
  with open(config_path) as f:
    diffs = checkpoint.config_differences(json.load(f), as_dict(settings), tuple(SECTIONS[c] for c in sorted(wanted)),
                                          ignore=RUNTIME_FIELDS)
  if diffs:
    raise IncompatibleCheckpointError(f'{directory} was converted for another config: ' + '; '.join(diffs))
  abstract = abstract_params(settings, wanted)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      os.path.join(os.path.abspath(directory), 'params'),
      args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, transforms={}))
  got = flatten(restored)
  wrong = ['/'.join(map(str, path)) + f': {tuple(got[path].shape)} vs {tuple(want.shape)}'
           for path, want in flatten(abstract).items() if tuple(got[path].shape) != tuple(want.shape)]
  if wrong:
    raise IncompatibleCheckpointError(f'{directory}: parameters of another shape: ' + '; '.join(wrong))
  return restored.get('dit'), restored.get('encoders')
