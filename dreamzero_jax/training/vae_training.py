"""Training the Wan2.1 VAE here, for configs without pretrained weights (docs/small_scale.md).

  python -m dreamzero_jax.training.vae_training --config configs/tiny.py --config.data.dir=D --workdir W \
      [--steps N] [--max_minutes M]

The VAE at the config's widths (cfg.vae) learns to reconstruct the canvases the DiT trains on,
composed by the pipeline's own code (evaluation preprocessing: no jitter), in clips as long as the
DiT's (1 + video.max_chunks x video.frames_per_chunk frames at data.frame_stride): its causal
convolutions see back to a clip's start from every latent frame of such a clip, so a VAE trained
on shorter clips drifts past their length. Loss: pixel MSE (on [-1, 1]) + vae_train.l1_weight x L1
of the decoding of one posterior sample, + vae_train.kl_weight x the KL of the posterior
N(mu, exp(logvar)) to N(0, 1); each a mean over its elements. The last
vae_train.heldout_fraction of the episodes (at least one) is never trained on: the reconstruction
PSNR is measured on them, over all their clips.

After training, the latent normalisation is folded into the weights: quant_conv's mu half is
rescaled so that `encode` (which normalises with the published Wan2.1 statistics) gives latents of
zero mean and unit variance per channel on the training frames, and post_quant_conv undoes it, so
decode(encode(x)) is unchanged and no module code or config changes.

Workdir:
  W/vae_state.npz      parameters, optimiser state and step (rerunning resumes; written every
                       vae_train.checkpoint_every steps and at the end, never with NaN or inf)
  W/vae_metrics.jsonl  per logged step: loss, mse, l1, kl, the batch's PSNR (and with
                       vae_train.eval_every the held-out PSNR; eval_seconds is the time it took)
  W/vae/               the result, read by `--config.init.vae=W/vae`: params.npz (the folded
                       WanVAE parameters) and meta.json (the vae config section, psnr_db, steps,
                       the dataset, the measured latent statistics, and mean_frame_psnr_db: the
                       PSNR of the mean training frame on the same clips, the static scene's score)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dreamzero_jax import checkpoint
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.config import ConfigError, load_config, split_config_args
from dreamzero_jax.datasets import canvas
from dreamzero_jax.errors import DataError
from dreamzero_jax.models import vae as vae_lib
from dreamzero_jax.models.vae import FRAMES_PER_LATENT

VAE_DIR = 'vae'
STATE_FILE = 'vae_state.npz'
METRICS_FILE = 'vae_metrics.jsonl'


class NonFiniteLossError(RuntimeError):
  pass


# ---- data ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EpisodeFrames:
  """Every frame of each episode as the DiT's canvas (uint8 [L, H, W, 3]), split by episode."""
  train: list[np.ndarray]
  heldout: list[np.ndarray]
  heldout_ids: list[str]
  stride: int         # data.frame_stride: the DiT sees every stride-th frame


def episode_frames(cfg: ml_collections.ConfigDict) -> EpisodeFrames:
  """The canvases of cfg.data.name's episodes; the last vae_train.heldout_fraction (at least one)
  held out."""
  from dreamzero_jax.datasets import pipeline  # here: the objective and update import without TFDS/Grain
  member = pipeline.open_member(settings_lib.from_config(cfg), cfg.data.name, 1.0, train=False)
  dataset, spec = member.loader.dataset, member.loader.spec
  count = len(dataset.lowdim)
  held = max(1, round(cfg.vae_train.heldout_fraction * count))
  if count - held < 1:
    raise DataError(f'{dataset.path}: {count} episode(s): training the VAE needs at least 2 (one is held out)')
  canvases = []
  for ep in range(count):
    record = dataset.source[ep]
    views = [list(record['images'][cam]) for cam in spec.cameras]
    video = np.empty((len(views[0]), spec.height, spec.width, 3), np.float32)
    canvas.compose(views, spec.canvas_layout, video, list(spec.image_shapes), None, spec.augment)
    canvases.append(np.round((video + 1.0) * 127.5).astype(np.uint8))  # exact: canvas.to_float inverts it
  ids = [eid.decode() for eid in dataset.lowdim.episode_id[count - held:]]
  return EpisodeFrames(canvases[:count - held], canvases[count - held:], ids, cfg.data.frame_stride)


def sample_clips(episodes: list[np.ndarray], batch: int, frames: int, stride: int,
                 rng: np.random.Generator) -> np.ndarray:
  """float32 [batch, frames, H, W, 3] in [-1, 1]: clips drawn uniformly among all windows."""
  span = stride * (frames - 1) + 1
  windows = np.array([max(len(e) - span + 1, 0) for e in episodes])
  if not windows.sum():
    raise DataError(f'no training episode has {span} frames (a clip of {frames} at stride {stride})')
  ep = rng.choice(len(episodes), size=batch, p=windows / windows.sum())
  starts = [int(rng.integers(windows[i])) for i in ep]
  return canvas.to_float(np.stack([episodes[i][s:s + span:stride] for i, s in zip(ep, starts)]))


def tiled_clips(episodes: list[np.ndarray], frames: int, stride: int) -> list[np.ndarray]:
  """Each episode cut into consecutive clips of `frames` frames at `stride` (the last frame of one
  is the first of the next); an episode shorter than one clip gives its longest 1 + 4k prefix."""
  out = []
  span = stride * (frames - 1)
  for e in episodes:
    starts = range(0, len(e) - span, span)
    if starts:
      out += [e[s:s + span + 1:stride] for s in starts]
    else:
      usable = (len(e) - 1) // stride // FRAMES_PER_LATENT * FRAMES_PER_LATENT
      out.append(e[:stride * usable + 1:stride])
  return out


def clip_frames(cfg: ml_collections.ConfigDict) -> int:
  """Frames in one of the DiT's clips (1 + video.max_chunks x video.frames_per_chunk)."""
  return 1 + cfg.video.max_chunks * cfg.video.frames_per_chunk


def train_clip_frames(cfg: ml_collections.ConfigDict) -> int:
  """Frames in a training clip: vae_train.clip_frames, or the DiT's clip. Shorter clips cost less
  per update; the held-out PSNR is always measured in the DiT's clips, so a VAE that drifts past its
  training length shows it there."""
  return cfg.vae_train.clip_frames or clip_frames(cfg)


# ---- the objective and the update ----------------------------------------------------------------

def learning_rate(cfg_train: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup over vae_train.warmup_steps, then cosine decay to a tenth at `steps`."""
  warmup = max(min(cfg_train.warmup_steps, steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(0.0, cfg_train.lr, warmup, max(steps, warmup + 1),
                                            end_value=0.1 * cfg_train.lr)


def make_optimizer(cfg_train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clipping, then AdamW at unit rate: the update scales it by the step's learning rate, an
  argument, so the schedule (and the step count it spans) is not compiled into the step."""
  return optax.chain(optax.clip_by_global_norm(cfg_train.grad_clip),
                     optax.adamw(1.0, weight_decay=0.0))


def vae_loss(vae: vae_lib.WanVAE, video: jax.Array, rng: jax.Array, cfg_train: ml_collections.ConfigDict):
  """(loss, metrics): MSE + l1_weight x L1 of one posterior sample's decoding, + kl_weight x the KL
  of the posterior to N(0, 1); each a mean over its elements."""
  mu, logvar = vae.posterior(video)
  logvar = jnp.clip(logvar, -30.0, 20.0)
  z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape)
  error = vae.decode_unnormalised(z) - video
  mse, l1 = jnp.mean(jnp.square(error)), jnp.mean(jnp.abs(error))
  kl = 0.5 * jnp.mean(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)
  loss = mse + cfg_train.l1_weight * l1 + cfg_train.kl_weight * kl
  return loss, dict(mse=mse, l1=l1, kl=kl)


def make_update(graphdef: nnx.GraphDef, cfg_train: ml_collections.ConfigDict):
  """(params, opt_state, video, images, rng, lr) -> (params, opt_state, metrics); pure, jit it
  donating the first two. `images` ([B, 1, H, W, 3] single frames, or None) adds their own loss:
  the frame-0 path (spatial features) learns from many scenes per update, the clip's frames teach
  the causal temporal path."""
  tx = make_optimizer(cfg_train)

  def loss_fn(params, video, rng):
    return vae_loss(nnx.merge(graphdef, params), video, rng, cfg_train)

  def joint_loss_fn(params, video, images, rng):
    loss, metrics = loss_fn(params, video, rng)
    if images is None:
      return loss, metrics
    image_loss, image_metrics = loss_fn(params, images, jax.random.fold_in(rng, 1))
    return loss + image_loss, dict(metrics, image_mse=image_metrics['mse'])

  def update(params, opt_state, video, images, rng, lr):
    (loss, metrics), grads = jax.value_and_grad(joint_loss_fn, has_aux=True)(params, video, images, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
    return params, opt_state, dict(metrics, loss=loss)

  return update


@functools.lru_cache(maxsize=4)
def _jitted_update(graphdef: nnx.GraphDef, cfg_train_items: tuple):
  return jax.jit(make_update(graphdef, ml_collections.ConfigDict(dict(cfg_train_items))), donate_argnums=(0, 1))


def jitted_update(graphdef: nnx.GraphDef, cfg_train: ml_collections.ConfigDict):
  """make_update jitted, donating parameters and optimiser state; compiled once per process for a
  graph and objective (a resume in the same process does not compile again)."""
  return _jitted_update(graphdef, tuple((k, cfg_train[k]) for k in ('grad_clip', 'l1_weight', 'kl_weight')))


# ---- evaluation and the normalisation fold -------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def encode(graphdef: nnx.GraphDef, params: dict, video: jax.Array) -> jax.Array:
  """The inference path's whole-clip encode (compiled once per graph and shape)."""
  return nnx.merge(graphdef, params).encode(video)


@functools.partial(jax.jit, static_argnums=0)
def decode(graphdef: nnx.GraphDef, params: dict, latents: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, params).decode(latents)


def clips_psnr(graphdef: nnx.GraphDef, params: dict, clips: list[np.ndarray]) -> float:
  """PSNR (dB, pixels on [0, 1]) of decode(encode(clip)) over all pixels of all clips."""
  squared, count = 0.0, 0
  for clip in clips:
    video = canvas.to_float(clip)[None]
    recon = decode(graphdef, params, encode(graphdef, params, video))
    squared += float(jnp.sum(jnp.square((recon - video) / 2.0)))
    count += video.size
  return float(10.0 * np.log10(count / max(squared, 1e-20)))


def mean_frame_psnr(train: list[np.ndarray], clips: list[np.ndarray]) -> float:
  """PSNR of the training frames' per-pixel mean as the reconstruction of every frame of `clips`:
  the static scene alone scores this much, so a VAE that carries the scene's changes must beat it."""
  mean = sum(e.astype(np.float64).sum(0) for e in train) / sum(len(e) for e in train)
  frames = np.concatenate(clips).astype(np.float64)
  return float(10.0 * np.log10(255.0 ** 2 / np.mean(np.square(frames - mean))))


def latent_moments(graphdef: nnx.GraphDef, params: dict, clips: list[np.ndarray], kind: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) of the unnormalised mu over every latent of `clips`."""
  mean_k, std_k = vae_lib.latent_statistics(kind)
  total, total_sq, count = 0.0, 0.0, 0
  for clip in clips:
    latents = np.asarray(encode(graphdef, params, canvas.to_float(clip)[None]), np.float64)
    mu = latents.reshape(-1, latents.shape[-1]) * std_k + mean_k
    total, total_sq, count = total + mu.sum(0), total_sq + np.square(mu).sum(0), count + len(mu)
  mean = total / count
  return mean, np.sqrt(np.maximum(total_sq / count - np.square(mean), 1e-12))


def fold_normalisation(params: dict, kind: str, mean: np.ndarray, std: np.ndarray) -> dict:
  """Parameters whose `encode` gives (mu - mean) / std per channel, with decode(encode(x)) unchanged.

  encode normalises with the published statistics (m_k, s_k), so quant_conv's mu half is mapped
  mu' = (mu - mean) a + m_k with a = s_k / std (its log-variance shifted by 2 log a, the same
  posterior); post_quant_conv takes mu' and first undoes the map: its kernel rows divided by a,
  its bias plus (mean - m_k / a) @ kernel.
  """
  mean_k, std_k = vae_lib.latent_statistics(kind)
  a = std_k / np.asarray(std, np.float64)
  mean = np.asarray(mean, np.float64)
  z = len(a)
  out = jax.tree.map(np.asarray, params)
  q_kernel = np.array(out['quant_conv']['kernel'], np.float64)    # [1, 1, 1, 2z, 2z]
  q_bias = np.array(out['quant_conv']['bias'], np.float64)
  q_kernel[..., :z] *= a
  q_bias[:z] = (q_bias[:z] - mean) * a + mean_k
  q_bias[z:] += 2.0 * np.log(a)
  p_kernel = np.asarray(out['post_quant_conv']['kernel'], np.float64)   # [1, 1, 1, z, z]
  p_bias = np.asarray(out['post_quant_conv']['bias'], np.float64) + (mean - mean_k / a) @ p_kernel[0, 0, 0]
  p_kernel = p_kernel / a[:, None]
  dtype = out['quant_conv']['kernel'].dtype
  out['quant_conv'] = dict(kernel=q_kernel.astype(dtype), bias=q_bias.astype(dtype))
  out['post_quant_conv'] = dict(kernel=p_kernel.astype(dtype), bias=p_bias.astype(dtype))
  return out


def heldout_psnr(cfg: ml_collections.ConfigDict, params: dict, frames: EpisodeFrames | None = None) -> float:
  """Reconstruction PSNR (dB) of the VAE `params` on the held-out episodes, in the DiT's clips."""
  frames = frames or episode_frames(cfg)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: vae_lib.WanVAE(cfg.vae, rngs=nnx.Rngs(0))))
  return clips_psnr(graphdef, params, tiled_clips(frames.heldout, clip_frames(cfg), frames.stride))


# ---- the run -------------------------------------------------------------------------------------

def _stored_result(cfg: ml_collections.ConfigDict, out_dir: str, steps: int) -> dict | None:
  """workdir/vae's result if it was trained to `steps` or more; refuses one of another vae config."""
  if not os.path.isfile(os.path.join(out_dir, checkpoint.META_FILE)):
    return None
  meta = checkpoint.read_weights_meta(out_dir)
  diffs = checkpoint.config_differences(meta.get('config', {}), cfg, ('vae',))
  if diffs:
    raise ValueError(f'{out_dir} holds a VAE trained for another vae config: ' + '; '.join(diffs))
  if meta.get('steps', -1) < steps:
    return None
  return dict(psnr_db=meta['psnr_db'], mean_frame_psnr_db=meta['mean_frame_psnr_db'], path=out_dir,
              steps=meta['steps'])


def train_vae(cfg: ml_collections.ConfigDict, workdir: str, steps: int | None = None,
              max_minutes: float | None = None, frames: EpisodeFrames | None = None) -> dict:
  """Trains (or resumes) the VAE in `workdir` to `steps` (default vae_train.steps) updates or until
  `max_minutes` of wall clock from this call (data, compilation and training) have passed, then
  folds the latent normalisation, measures the held-out PSNR and writes workdir/vae (seconds more).
  `frames` (default: episode_frames(cfg)) are the episodes to train on and hold out.
  Returns dict(psnr_db, mean_frame_psnr_db, path, steps); at once if workdir/vae is already that far."""
  started = time.time()
  t = cfg.vae_train
  steps = steps or t.steps
  out_dir = os.path.join(os.path.abspath(workdir), VAE_DIR)
  done = _stored_result(cfg, out_dir, steps)
  if done:
    return done
  frames = frames or episode_frames(cfg)
  graphdef, params = nnx.split(vae_lib.WanVAE(settings_lib.from_config(cfg).vae, rngs=nnx.Rngs(cfg.seed + 1)))
  params = params.to_pure_dict()
  opt_state = make_optimizer(t).init(params)
  step = 0
  state_path = os.path.join(workdir, STATE_FILE)
  if os.path.isfile(state_path):
    saved = checkpoint.load_arrays(state_path, dict(step=np.zeros((), np.int64), params=params, opt_state=opt_state))
    step, params, opt_state = int(saved['step']), saved['params'], saved['opt_state']
    print(f'vae: resuming at step {step} from {state_path}', flush=True)

  def save():
    checkpoint.save_arrays(state_path, dict(step=np.int64(step), params=params, opt_state=opt_state))

  update = jitted_update(graphdef, t)
  schedule = learning_rate(t, steps)
  heldout = tiled_clips(frames.heldout, clip_frames(cfg), frames.stride)
  key = jax.random.key(cfg.seed)
  deadline = started + 60.0 * max_minutes if max_minutes else None
  os.makedirs(workdir, exist_ok=True)
  eval_seconds = 0.0   # spent on eval_every evaluations, reported apart from training time
  metrics_path = os.path.join(workdir, METRICS_FILE)
  checkpoint.trim_metrics_log(metrics_path, step)
  with open(metrics_path, 'a') as log:
    while step < steps and not (deadline and time.time() > deadline):
      video = sample_clips(frames.train, t.batch_size, train_clip_frames(cfg), frames.stride,
                           np.random.default_rng([cfg.seed, step]))
      images = sample_clips(frames.train, t.image_batch, 1, 1, np.random.default_rng([cfg.seed, step, 1])
                            ) if t.image_batch else None
      params, opt_state, metrics = update(params, opt_state, video, images, jax.random.fold_in(key, step),
                                          np.float32(schedule(step)))
      loss = float(metrics['loss'])
      if not np.isfinite(loss):
        raise NonFiniteLossError(f'vae step {step + 1}: loss {loss} is not finite; the last checkpoint '
                                 f'({state_path}) is kept')
      step += 1
      record = {}
      if step % t.log_every == 0 or step == steps:
        record = {k: float(v) for k, v in metrics.items()}
        record['batch_psnr_db'] = float(10 * np.log10(4.0 / max(record['mse'], 1e-20)))
      if t.eval_every and step % t.eval_every == 0:
        tick = time.time()
        record['heldout_psnr_db'] = clips_psnr(graphdef, params, heldout)
        eval_seconds += time.time() - tick
      if record:
        seconds = time.time() - started
        log.write(json.dumps(dict(step=step, seconds=round(seconds, 1), eval_seconds=round(eval_seconds, 1),
                                  **record)) + '\n')
        log.flush()
        print(f'vae step {step}/{steps} ({seconds:.0f} s): ' +
              ', '.join(f'{k} {v:.4g}' for k, v in record.items()), flush=True)
      if step % t.checkpoint_every == 0:
        save()
  save()
  result = finalise(cfg, graphdef, params, frames, out_dir, step, minutes=(time.time() - started) / 60)
  print(f'vae: {step} steps, held-out PSNR {result["psnr_db"]:.2f} dB (the mean training frame: '
        f'{result["mean_frame_psnr_db"]:.2f} dB); weights in {out_dir} (--config.init.vae={out_dir})', flush=True)
  return result


def finalise(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: dict, frames: EpisodeFrames,
             out_dir: str, step: int, minutes: float) -> dict:
  """Folds the normalisation measured on the training frames into `params`, measures the held-out
  PSNR and writes out_dir."""
  length = clip_frames(cfg)
  mean, std = latent_moments(graphdef, params, tiled_clips(frames.train, length, frames.stride), cfg.vae.kind)
  folded = fold_normalisation(params, cfg.vae.kind, mean, std)
  heldout = tiled_clips(frames.heldout, length, frames.stride)
  psnr, baseline = clips_psnr(graphdef, folded, heldout), mean_frame_psnr(frames.train, heldout)
  meta = dict(config=dict(vae=cfg.vae.to_dict()), psnr_db=psnr, mean_frame_psnr_db=baseline, steps=step,
              minutes=round(minutes, 2),
              data_dir=os.path.abspath(cfg.data.dir), dataset=cfg.data.name, heldout_episodes=frames.heldout_ids,
              latent_mean=mean.tolist(), latent_std=std.tolist(), vae_train=cfg.vae_train.to_dict())
  checkpoint.save_weights(out_dir, folded, meta)
  return dict(psnr_db=psnr, mean_frame_psnr_db=baseline, path=out_dir, steps=step)


def main(argv=None) -> int:
  overrides, rest = split_config_args(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog='python -m dreamzero_jax.training.vae_training', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='configs/NAME.py[:ARG]')
  p.add_argument('--workdir', required=True, help='training state and the result (W/vae); resumed')
  p.add_argument('--steps', type=int, help='updates to train to (default vae_train.steps)')
  p.add_argument('--max_minutes', type=float, help='end training after this many minutes (resumable)')
  args = p.parse_args(rest)
  try:
    cfg = load_config(args.config, overrides)
    result = train_vae(cfg, args.workdir, args.steps, args.max_minutes)
  except NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(dict(vae_psnr_db=round(result['psnr_db'], 2),
                        mean_frame_psnr_db=round(result['mean_frame_psnr_db'], 2), path=result['path'],
                        steps=result['steps'])))
  return 0


if __name__ == '__main__':
  sys.exit(main())
