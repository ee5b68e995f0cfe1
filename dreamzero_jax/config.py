"""The base config and loading config files: the Wan2.1-I2V-14B DreamZero model on DROID
(`get_base_config`), `configs/NAME.py[:ARG]` files over it with `--config.a.b=value` overrides
(`load_config`), and a checkpoint's stored config read over it (`config_from_dict`).

Every field of the base config is read somewhere; an override of a key that is not there is an error
that names the key. Override values are parsed as Python literals and must keep the type of the field
they replace. The loaded config is validated: counts that must be positive (steps, sizes, intervals)
are refused naming the field.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections

from dreamzero_jax import embodiments, sharding


class ConfigError(ValueError):
  """A config file or override that cannot be applied."""


# The official DreamZero negative prompt (dreamzero_cotrain.py): the unconditional branch of video
# CFG. (Wan's own default is a Chinese prompt; DreamZero trained and serves with this English one.)
DREAMZERO_NEGATIVE_PROMPT = (
    'Vibrant colors, overexposed, static, blurry details, text, subtitles, style, artwork, painting, '
    'image, still, grayscale, dull, worst quality, low quality, JPEG artifacts, ugly, mutilated, extra '
    'fingers, bad hands, bad face, deformed, disfigured, mutated limbs, fused fingers, stagnant image, '
    'cluttered background, three legs, many people in the background, walking backwards.')


def get_base_config() -> ml_collections.ConfigDict:
  """The shared defaults (the 14B model on DROID): configs/ files override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The DiT plus DreamZero's action/state modules (docs/model.md).
  c.model = ml_collections.ConfigDict(dict(
      dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, freq_dim=256,
      in_channels=36, out_channels=16, patch_size=(1, 2, 2),
      text_dim=4096, text_len=512,
      image_dim=1280,            # CLIP feature width; 0 = no image branch (T2V / TI2V)
      image_tokens=257,
      eps=1e-6, rope_theta=10000.0, cross_attn_norm=True,
      action_dim=32, state_dim=64, embodiment_hidden=1024, num_embodiments=1,
      dtype='bfloat16', param_dtype='float32',
      scan_layers=True, remat_policy='nothing_saveable',
      attention='auto',          # splash on TPU, cuDNN on GPU, else XLA; or name one (attention.py)
      attention_block_q=1024,    # XLA path: queries in blocks of this many (bounds score memory); 0 = all
      # The same for the cached inference forwards (cache write, denoise): B=2 (CFG) against the whole
      # cache, so 256 keeps the 14B serving step's scores at 0.74 GiB a block (README "Serving memory").
      inference_attention_block_q=256,
      # Pallas kernels (fused LayerNorm + modulation, q/k RMSNorm + RoPE, fp8 GEMM): 'auto' = Pallas on a
      # GPU with fallback to XLA, XLA elsewhere; or 'pallas', 'interpret', 'xla' (kernels/registry.py).
      kernels='auto',
      # Inference weights (for_inference in dit.py): 'none' = the blocks' linear layers in model.dtype;
      # 'fp8' = e4m3 with per-output-channel scales through the fp8 GEMM. Training is unaffected.
      quantization='none',
      kv_cache_dtype='auto',     # 'auto' = e4m3 with fp8 quantization, else model.dtype; or a dtype name
      attention_mask='block_causal',  # or 'bidirectional' (the AR-vs-bidirectional ablation)
      # State queries at inference: 'all' = the official cached forward (the whole cache and every new
      # token); 'self' = as in training (cached rollout == teacher-forcing forward). docs/fidelity.md.
      inference_state_attention='all',
      seq_pad_multiple=128,      # pad token sequences to a multiple (cuDNN flash backward needs it)
  ))

  # Video geometry and chunking (docs/model.md).
  c.video = ml_collections.ConfigDict(dict(
      height=352, width=640,     # the 2x2 canvas
      vae_spatial=8, vae_temporal=4, latent_channels=16,
      frames_per_chunk=8,        # pixel frames per chunk (2 latent frames)
      max_chunks=4,              # K: chunks of context in one training clip
      action_horizon=24,         # actions per chunk
  ))

  # Frozen encoders.
  c.vae = ml_collections.ConfigDict(dict(
      kind='wan2.1', z_dim=16, base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
      temporal_downsample=(False, True, True),
      decoder_base_dim=0))       # 0 = base_dim; Wan2.2's decoder is wider (256)
  c.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=256384, dim=4096, ffn_dim=10240, num_heads=64, num_layers=24,
      num_buckets=32, max_distance=128, tokenizer=''))
  c.image_encoder = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=14, width=1280, num_layers=32, num_heads=16, mlp_dim=5120))

  # The embodiment's layout comes from its registry entry (dreamzero_jax/embodiments.py): cameras,
  # canvas_layout ('droid': wrist on the top row, or 'grid'; docs/model.md), control_hz, frame_stride,
  # action_dim, state_dim, relative_action_dims (action dims taken relative to the anchor state's).
  c.data = ml_collections.ConfigDict(dict(
      dir='', name='droid', **embodiments.data_config('droid'),
      prompt_template='',        # '' = the embodiment's (embodiments.PROMPT_TEMPLATES), or a name / text
      num_workers=0, seed=0,
      idle_threshold=1e-3,       # a chunk moving less than this (state and action units) is idle
      anchor_stride=1,           # clips anchored every this many steps of a segment (1 = every step)
      # Encode every distinct clip once with the frozen encoders (unaugmented) before training and
      # train the DiT on the stored latents (training/latent_cache.py); needs augmentation off.
      latent_cache=False,
      latent_cache_dir='',       # '' = WORKDIR/latent_cache
      # Views as the release prepares them (its transform/video.py): each view cropped to this
      # fraction of each side, at a random place in training and centred in evaluation and serving;
      # then in training torchvision-style colour jitter (factors drawn from [1-x, 1+x], hue shift
      # from [-h, h]), drawn once per view and clip.
      augment_crop_scale=0.95,
      augment_brightness=0.3, augment_contrast=0.4, augment_saturation=0.5, augment_hue=0.08,
      on_corrupt='fail',         # 'fail' or 'skip' a record whose images do not decode
      max_corrupt=100,           # skip: give up past this many bad records (or failed reads in a row)
      mixture=''))               # 'name:weight,...' datasets under data.dir; '' = data.name alone

  c.train = ml_collections.ConfigDict(dict(
      steps=100_000, batch_size=128, checkpoint_every=1000, keep_checkpoints=3,
      lr=1e-5, warmup_fraction=0.05, b1=0.95, b2=0.999, weight_decay=1e-5, grad_clip=1.0,
      timestep_schedule='shared',  # 'shared' | 'decoupled' | 'flash'
      video_loss_weight=1.0, action_loss_weight=1.0, num_train_timesteps=1000, shift=5.0,
      # An update averages the gradients of grad_accum_steps micro-batches of batch_size (the
      # global batch is their product); train.steps, the lr schedule and EMA count updates.
      grad_accum_steps=1, ema_decay=0.0,
      # Action MSE divided by 'padded' = every padded action element of every sample (the official
      # trainer: ~4x lighter than 'valid' for DROID's 8 of 32 dims) or 'valid' = the masked elements.
      action_loss_norm='padded',
      lora_rank=0,               # 0 = full fine-tuning (the paper); > 0 trains LoRA factors only
      lora_alpha=4.0, lora_targets='q,k,v,o,ffn',
      log_every=10))

  # The release's sampler (docs/inference.md). integer_timesteps: the DiT reads int(sigma * 1000)
  # (False: the float level). dynamic_skip_velocity: the guided velocity the dynamic rule compares
  # ('video' as the release, or 'action'). noise_seed: every chunk starts from this seed's noise
  # (the release's 1140); -1 = fresh noise per chunk from the episode's seed.
  c.sampler = ml_collections.ConfigDict(dict(
      kind='unipc', num_steps=16, shift=5.0, cfg_scale=5.0,
      dit_step_mask='1110001000100111', dynamic_skip=False, dynamic_skip_velocity='video',
      integer_timesteps=True, noise_seed=1140,
      cfg_parallel=False,        # True: the CFG branches on two devices (one each), not batched on one
      negative_prompt=DREAMZERO_NEGATIVE_PROMPT))

  # Action post-processing (docs/inference.md): smooth = 2x upsample, Savitzky-Golay, downsample (off:
  # the release returns unsmoothed actions); gripper_dims snapped to low/high, high above the threshold.
  c.postprocess = ml_collections.ConfigDict(dict(
      smooth=False, savgol_window=7, savgol_polyorder=2,
      gripper_dims=(), gripper_threshold=0.5, gripper_low=0.0, gripper_high=1.0))

  # The policy server's camera images (resized into the canvas quadrants).
  # roboarena_frames: camera frames a later RoboArena-style call feeds the model (the release's 4,
  # the last ones buffered), each repeated to video.frames_per_chunk (serving/roboarena.py).
  c.serve = ml_collections.ConfigDict(dict(camera_height=180, camera_width=320, roboarena_frames=4))
  # How the policy turns a call's observed frames into latents: 'per_call' = the release's fresh VAE
  # encode of [the call's first frame + its frames], first latent dropped; 'streaming' = the VAE's
  # causal cache carried across chunks, as a training clip is encoded.
  c.serve.observation_encode = 'per_call'
  # The devices a served policy runs on (`serve --mesh`): '' = one device; 'tensor=N' splits the DiT's
  # heads and MLP (and the KV cache's heads) over N devices, 'data=2' the CFG branches, or both
  # ('data=2,tensor=4'), with mesh.rules (inference/rollout.py; README "Serving memory").
  c.serve.mesh = ''

  # Pretrained weights: a `python -m dreamzero_jax.convert` output (Wan2.1/2.2 or DreamZero release).
  # Training in a fresh workdir starts the DiT from it, and the frozen VAE / umT5 / CLIP are its
  # weights wherever they run (training, evaluation, serving: the path travels in the checkpoint's
  # config). '' = random initialisation (toy configs and tests).
  # init.vae: a VAE trained here (`python -m dreamzero_jax.training.vae_training` writes WORKDIR/vae) replaces
  # the frozen VAE's weights, random or converted, wherever it runs; '' = keep them.
  # init.vae_sha256: the digest of init.vae's parameters the DiT was trained with (training records
  # it; loading other weights under that path, or resuming on them, is refused); '' = unchecked.
  # init.pretrained: the DiT parameters of the same model a fresh run starts from, with a fresh
  # optimiser: a train.py workdir (e.g. a video-only pretraining run; its newest parameters, EMA when
  # kept) or a weights directory exported from one (checkpoint.export_model_params); '' =
  # init.converted or random.
  c.init = ml_collections.ConfigDict(dict(converted='', vae='', vae_sha256='', pretrained=''))

  # Training the VAE on the dataset's canvases (dreamzero_jax/training/vae_training.py, docs/small_scale.md)
  # for configs with no pretrained one, in clips as long as the DiT's. Loss: pixel MSE + l1_weight x
  # L1 + kl_weight x KL (means over elements). The last heldout_fraction of the episodes (at least
  # one) is held out for the reconstruction PSNR, measured at the end and every eval_every steps
  # (0 = only at the end). image_batch: single frames per update beside the batch_size clips, each
  # with its own loss (Wan2.1's VAE, too, learned images before videos): 0 = clips only.
  c.vae_train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=1, image_batch=0, lr=2e-3, warmup_steps=20, grad_clip=1.0, l1_weight=1.0,
      kl_weight=1e-4, heldout_fraction=0.1, checkpoint_every=100, log_every=20, eval_every=0,
      clip_frames=0))   # frames of a training clip (1 + 4k); 0 = the DiT's clip (the held-out PSNR's always)

  # Mesh sizes (one -1 takes the remaining devices) and the logical-axis -> mesh-axis rules.
  c.mesh = ml_collections.ConfigDict(dict(
      axes=('data', 'fsdp', 'context', 'tensor'), shape=(1, -1, 1, 1),
      rules=sharding.DEFAULT_RULES))
  return c


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
  """The config stored in a checkpoint (JSON lists back to tuples where the base config has tuples)."""
  cfg = get_base_config()   # the defaults the stored values fill in

  def fill(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in node and isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value)
      elif key == 'relative_action_dims' and isinstance(value, int):
        node[key] = tuple(range(value))   # saved before explicit dims: the leading N
      else:
        node[key] = tuple(value) if isinstance(value, list) else value

  fill(cfg, saved)
  return cfg


# A source checkout's root (configs/ beside the package): relative config paths also resolve there,
# so `--config configs/tiny.py` works from any directory.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_config_module(path: str):
  if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(os.path.join(_CHECKOUT, path)):
    path = os.path.join(_CHECKOUT, path)
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  # Config files import their siblings as `configs.<name>`: the directory holding the `configs`
  # package (the repository root, also for configs/ablations/*.py) must be importable.
  folder = here = os.path.dirname(os.path.abspath(path))
  while os.path.basename(folder) != 'configs' and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  root = os.path.dirname(folder if os.path.basename(folder) == 'configs' else here)
  if root not in sys.path:
    sys.path.insert(0, root)
  name = '_dreamzero_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config()')
  return module


def _parse_value(key: str, text: str, old):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # a bare string such as `--config.data.dir=/tmp/d`
  if old is None:
    return value
  if isinstance(old, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ('true', 'false'):
      return value.lower() == 'true'
  elif isinstance(old, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  elif isinstance(old, tuple) and isinstance(value, (list, tuple)):
    return tuple(value)
  elif isinstance(old, str):
    return str(value) if not isinstance(value, str) else value
  elif isinstance(value, type(old)) and not isinstance(value, bool):
    return value
  raise ConfigError(f'--config.{key}={text}: expected {type(old).__name__}, got {type(value).__name__}')


# Counts that a run divides by, loops over or builds arrays from: zero or less is never meant.
POSITIVE_FIELDS = (
    'train.steps', 'train.batch_size', 'train.checkpoint_every', 'train.keep_checkpoints',
    'train.log_every', 'train.grad_accum_steps', 'train.num_train_timesteps',
    'model.dim', 'model.num_layers', 'model.num_heads', 'model.ffn_dim', 'model.freq_dim',
    'model.text_dim', 'model.text_len', 'model.action_dim', 'model.state_dim',
    'model.embodiment_hidden', 'model.num_embodiments', 'model.in_channels', 'model.out_channels',
    'model.seq_pad_multiple',
    'video.height', 'video.width', 'video.vae_spatial', 'video.vae_temporal',
    'video.latent_channels', 'video.frames_per_chunk', 'video.max_chunks', 'video.action_horizon',
    'data.control_hz', 'data.frame_stride', 'data.action_dim', 'data.state_dim',
    'data.max_corrupt', 'data.anchor_stride', 'sampler.num_steps', 'serve.camera_height', 'serve.camera_width',
    'vae_train.steps', 'vae_train.batch_size', 'vae_train.checkpoint_every', 'vae_train.log_every')
# Counts for which 0 means "none" or "off".
NON_NEGATIVE_FIELDS = ('train.lora_rank', 'data.num_workers', 'data.relative_action_dims',
                       'model.image_dim', 'model.attention_block_q', 'model.inference_attention_block_q',
                       'vae_train.eval_every', 'vae_train.image_batch', 'vae_train.clip_frames')


def _lookup(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first count that is out of range (fields a config lacks pass)."""
  for fields, low, what in ((POSITIVE_FIELDS, 1, 'positive'), (NON_NEGATIVE_FIELDS, 0, '>= 0')):
    for key in fields:
      value = _lookup(config, key)
      if isinstance(value, int) and not isinstance(value, bool) and value < low:
        raise ConfigError(f'{key}: {value} (must be {what})')
  clip = _lookup(config, 'vae_train.clip_frames')
  if isinstance(clip, int) and clip and clip % 4 != 1:
    raise ConfigError(f'vae_train.clip_frames: {clip} (must be 1 + a multiple of 4, or 0 for the DiT\'s clip)')
  lr = _lookup(config, 'train.lr')
  if isinstance(lr, float) and not (lr == lr and abs(lr) != float('inf')):
    raise ConfigError(f'train.lr: {lr} (must be finite)')


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets config.<key> (dotted) from the string `text`; the key must exist."""
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f'unknown config key: {".".join(parents[:i + 1])}')
    node = node[part]
  if leaf not in node:
    raise ConfigError(f'unknown config key: {key}')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f'config key {key} is a section, not a value')
  node[leaf] = _parse_value(key, text, node[leaf])


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and applies overrides given as `a.b=value` (or `--config.a.b=value`)."""
  path, _, arg = spec.partition(':')
  module = _import_config_module(path)
  try:
    config = module.get_config(arg or None)
  except (ValueError, KeyError) as e:  # an unknown variant (`tiny.py:bogus`) is the user's input
    raise ConfigError(f'--config {spec}: {e}') from None
  for item in overrides:
    item = item.removeprefix('--').removeprefix('config.')
    key, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f'override needs key=value: {item}')
    apply_override(config, key, text)
  validate(config)
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` overrides from the other command-line arguments."""
  overrides, rest = [], []
  for a in argv:
    (overrides if a.startswith('--config.') else rest).append(a)
  return overrides, rest
