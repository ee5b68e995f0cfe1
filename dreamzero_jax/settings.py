"""The config as frozen, typed slices: what the layers below the entry points take.

The configs stay ml_collections (`file.py:variant`, `--config.a.b=v`, a checkpoint's stored config);
an entry point turns one into a `Settings` once (`from_config`), and models/, kernels/, datasets/,
inference/ and serving/ take its slices (`settings.model`, `settings.sampler`, ...), never the
ConfigDict (tests/test_layers.py enforces it). Each slice mirrors one section of the base config
field for field: a key the slice lacks, or a field the section lacks, is an error naming it. Sequences
become tuples, so every slice is hashable (a jit static argument) and compares by value.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

Rule = tuple[str, Any]   # a logical axis -> None, a mesh axis, or a tuple of mesh axes (sharding.py)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """`model.*`: the DiT and DreamZero's action/state modules (config.py documents each field)."""
  dim: int
  num_layers: int
  num_heads: int
  ffn_dim: int
  freq_dim: int
  in_channels: int
  out_channels: int
  patch_size: tuple[int, ...]
  text_dim: int
  text_len: int
  image_dim: int
  image_tokens: int
  eps: float
  rope_theta: float
  cross_attn_norm: bool
  action_dim: int
  state_dim: int
  embodiment_hidden: int
  num_embodiments: int
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat_policy: str
  attention: str
  attention_block_q: int
  inference_attention_block_q: int
  kernels: str
  quantization: str
  kv_cache_dtype: str
  attention_mask: str
  inference_state_attention: str
  seq_pad_multiple: int


@dataclasses.dataclass(frozen=True)
class VideoSettings:
  """`video.*`: the canvas, the VAE's strides and the chunking."""
  height: int
  width: int
  vae_spatial: int
  vae_temporal: int
  latent_channels: int
  frames_per_chunk: int
  max_chunks: int
  action_horizon: int


@dataclasses.dataclass(frozen=True)
class VAESettings:
  """`vae.*`: the Wan VAE's architecture."""
  kind: str
  z_dim: int
  base_dim: int
  dim_mult: tuple[int, ...]
  num_res_blocks: int
  temporal_downsample: tuple[bool, ...]
  decoder_base_dim: int


@dataclasses.dataclass(frozen=True)
class TextEncoderSettings:
  """`text_encoder.*`: umT5."""
  vocab_size: int
  dim: int
  ffn_dim: int
  num_heads: int
  num_layers: int
  num_buckets: int
  max_distance: int
  tokenizer: str


@dataclasses.dataclass(frozen=True)
class ImageEncoderSettings:
  """`image_encoder.*`: the CLIP vision tower."""
  image_size: int
  patch_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """`data.*`: the dataset, the embodiment's layout, augmentation and the reader's policy."""
  dir: str
  name: str
  embodiment: str
  cameras: tuple[str, ...]
  canvas_layout: str
  control_hz: int
  frame_stride: int
  action_dim: int
  state_dim: int
  relative_action_dims: tuple[int, ...]
  prompt_template: str
  num_workers: int
  seed: int
  idle_threshold: float
  anchor_stride: int
  latent_cache: bool
  latent_cache_dir: str
  augment_crop_scale: float
  augment_brightness: float
  augment_contrast: float
  augment_saturation: float
  augment_hue: float
  on_corrupt: str
  max_corrupt: int
  mixture: str


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """`train.*`: the DiT's optimisation and objective."""
  steps: int
  batch_size: int
  checkpoint_every: int
  keep_checkpoints: int
  lr: float
  warmup_fraction: float
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float
  timestep_schedule: str
  video_loss_weight: float
  action_loss_weight: float
  num_train_timesteps: int
  shift: float
  grad_accum_steps: int
  ema_decay: float
  action_loss_norm: str
  lora_rank: int
  lora_alpha: float
  lora_targets: str
  log_every: int


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """`sampler.*`: the denoising loop (docs/inference.md); hashable, so a jit static argument."""
  kind: str
  num_steps: int
  shift: float
  cfg_scale: float
  dit_step_mask: str
  dynamic_skip: bool
  dynamic_skip_velocity: str
  integer_timesteps: bool
  noise_seed: int
  cfg_parallel: bool
  negative_prompt: str


@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
  """`postprocess.*`: action smoothing and gripper snapping."""
  smooth: bool
  savgol_window: int
  savgol_polyorder: int
  gripper_dims: tuple[int, ...]
  gripper_threshold: float
  gripper_low: float
  gripper_high: float


@dataclasses.dataclass(frozen=True)
class ServeSettings:
  """`serve.*`: the policy server's images, observation encoding and mesh (`serve --mesh`)."""
  camera_height: int
  camera_width: int
  roboarena_frames: int
  observation_encode: str
  mesh: str


@dataclasses.dataclass(frozen=True)
class InitSettings:
  """`init.*`: the pretrained weights (converted, a trained VAE and its digest, a pretraining run)."""
  converted: str
  vae: str
  vae_sha256: str
  pretrained: str


@dataclasses.dataclass(frozen=True)
class VAETrainSettings:
  """`vae_train.*`: training the VAE on the dataset's canvases (training/vae_training.py)."""
  steps: int
  batch_size: int
  image_batch: int
  lr: float
  warmup_steps: int
  grad_clip: float
  l1_weight: float
  kl_weight: float
  heldout_fraction: float
  checkpoint_every: int
  log_every: int
  eval_every: int
  clip_frames: int


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """`mesh.*`: the training mesh's axes and sizes, and the logical-axis -> mesh-axis rules."""
  axes: tuple[str, ...]
  shape: tuple[int, ...]
  rules: tuple[Rule, ...]


@dataclasses.dataclass(frozen=True)
class Settings:
  """The whole config, one slice per section: for what needs several (a Policy, the loader)."""
  seed: int
  model: ModelSettings
  video: VideoSettings
  vae: VAESettings
  text_encoder: TextEncoderSettings
  image_encoder: ImageEncoderSettings
  data: DataSettings
  train: TrainSettings
  sampler: SamplerSettings
  postprocess: PostprocessSettings
  serve: ServeSettings
  init: InitSettings
  vae_train: VAETrainSettings
  mesh: MeshSettings


def _tuples(value):
  """Lists (JSON, overrides) as tuples, all the way down."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _value(key: str, value, kind):
  """`value` as the field type `kind`, or a ValueError naming `key`."""
  if dataclasses.is_dataclass(kind):
    return _section(kind, value, key)
  origin = typing.get_origin(kind)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f'{key}: expected a sequence, got {type(value).__name__} {value!r}')
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str, bool):
      return tuple(_value(f'{key}[{i}]', v, args[0]) for i, v in enumerate(value))
    return _tuples(value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind in (int, float, str, bool) and (type(value) is not kind):
    raise ValueError(f'{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}')
  return value


def _section(cls, values, name: str):
  """One slice from its section (anything with .items(): a ConfigDict or a dict), keys exactly the
  slice's fields."""
  if not hasattr(values, 'items'):
    raise ValueError(f'{name}: expected a config section, got {type(values).__name__}')
  values = dict(values.items())
  hints = typing.get_type_hints(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  prefix = f'{name}.' if name else ''
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f'{prefix}{unknown[0]}: not a field of {cls.__name__} (a config key no layer reads)')
  missing = [f for f in fields if f not in values]
  if missing:
    raise ValueError(f'{prefix}{missing[0]}: missing from the config')
  return cls(**{f: _value(prefix + f, values[f], hints[f]) for f in fields})


def from_config(config: Mapping) -> Settings:
  """The typed Settings of a config (a ConfigDict, or its to_dict()); an unknown or missing key is a
  ValueError naming it."""
  return _section(Settings, config, '')


def as_dict(settings: Settings) -> dict:
  """The settings as the nested dict of the config they came from (`config.to_dict()`)."""
  return dataclasses.asdict(settings)

