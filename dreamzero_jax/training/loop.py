"""The training loop behind train.py: data -> frozen encoders -> train step, with checkpoints.

Logs losses (video, action), grad norm, lr, samples/s, tokens/s and MFU to the console (progress
bar with ETA) and to TensorBoard in WORKDIR/tb. A non-finite loss stops the run naming the step
and the loss term; so do non-finite parameters, checked before every checkpoint is written: the
last good checkpoint is kept and nothing newer is written. On resume, the checkpoint's norm stats
must equal the dataset's (a run never mixes two normalisations).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from dreamzero_jax import checkpoint
from dreamzero_jax import settings as settings_lib
from dreamzero_jax.datasets import normalization, pipeline
from dreamzero_jax.models import encoders
from dreamzero_jax.training import latent_cache, train_aot, trainer

# bf16 dense peak per chip (datasheet), for MFU.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12,
              'TPU v5e': 197e12, 'TPU v4': 275e12, 'TPU v6': 918e12}


class NonFiniteLossError(RuntimeError):
  pass


def train_flops(cfg, dit_params: int) -> float:
  """Model FLOPs of one train step: 6 N per token plus dense attention (fwd + bwd)."""
  tokens = train_aot.sequence_length(cfg)[0]
  m = cfg.model
  attention = 12 * m.num_layers * m.dim * tokens ** 2
  return trainer.update_batch_size(cfg.train) * (6 * dit_params * tokens + attention)


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops * jax.device_count()
  return None


def check_data_batch(batch: dict, cfg) -> None:
  """The pipeline's batch against the config, with the field named on a mismatch."""
  v, m, b = cfg.video, cfg.model, trainer.update_batch_size(cfg.train) // jax.process_count()
  k = v.max_chunks
  pixels = (('latent_row', (b,)) if cfg.data.latent_cache else
            ('video', (b, 1 + k * v.frames_per_chunk, v.height, v.width, 3)))
  want = {pixels[0]: pixels[1],
          'actions': (b, k * v.action_horizon, m.action_dim), 'action_mask': (b, k * v.action_horizon, m.action_dim),
          'state': (b, k, m.state_dim), 'chunk_mask': (b, k), 'embodiment_id': (b,), 'instruction': (b,)}
  pipeline.check_batch(batch, want)


class Logger:
  """Console progress bar, TensorBoard and metrics.jsonl; only process 0 of a multi-host job
  writes (the others keep a silent bar).

  metrics.jsonl holds one curve: records past `start_step` (the step the run resumes from, 0 for
  a fresh start) came from a run whose later steps are being trained again, and are dropped."""

  def __init__(self, workdir: str, total: int, start_step: int = 0):
    self.primary = jax.process_index() == 0
    self.writer = SummaryWriter(os.path.join(workdir, 'tb')) if self.primary else None
    self.bar = tqdm.tqdm(total=total, dynamic_ncols=True, desc='train', disable=not self.primary)
    self.jsonl = None
    if self.primary:
      path = os.path.join(workdir, 'metrics.jsonl')
      checkpoint.trim_metrics_log(path, start_step)
      self.jsonl = open(path, 'a')

  def log(self, step: int, metrics: dict) -> None:
    if not self.primary:
      return
    for k, v in metrics.items():
      self.writer.add_scalar(f'train/{k}', v, step)
    self.jsonl.write(json.dumps(dict(step=step, **metrics)) + '\n')
    self.jsonl.flush()
    self.bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items() if k in ('loss', 'video_loss', 'action_loss')})

  def close(self):
    self.bar.close()
    if self.primary:
      self.writer.close()
      self.jsonl.close()


_leaves_finite = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))


def count_nonfinite_leaves(tree) -> tuple[int, int]:
  """(non-finite floating leaves, floating leaves) of a pytree: one reduction per leaf, on device."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  finite = np.asarray(_leaves_finite(leaves)) if leaves else np.ones(0, bool)
  return int((~finite).sum()), len(leaves)


def check_resumed_stats(saved: dict, dataset: dict, workdir: str, step: int) -> None:
  """Refuses a resume whose dataset statistics differ from the checkpoint's: its batches would be
  normalised one way and its checkpoints would tell the server another."""
  diffs = normalization.stats_differences(saved, dataset)
  if diffs:
    raise ValueError(f'{workdir}: the checkpoint (step {step}) was trained with other normalisation statistics '
                     f'than the dataset now gives ({", ".join(diffs)} differ): restore that dataset and its '
                     'norm_stats.json, or train in a new workdir')


def _norm_stats(settings: settings_lib.Settings) -> dict:
  """The statistics that normalise the primary dataset (saved with it, or computed as the pipeline does)."""
  return pipeline.open_member(settings, settings.data.name, 1.0, train=True).loader.stats


def _compiled_step(cfg, graphdef, abstract_state):
  """The jitted step and how a batch reaches it, over cfg's mesh (one device is a mesh of one;
  multi-host: each host feeds its own slice of the global batch)."""
  return trainer.compiled_train_step(cfg, graphdef, abstract_state,
                                     train_aot.abstract_batch(cfg, trainer.update_batch_size(cfg.train)))


def start_params(cfg: ml_collections.ConfigDict) -> dict:
  """The DiT parameters a fresh run starts from (host arrays): init.pretrained's (a weights directory
  of checkpoint.export_model_params, or a train workdir's newest checkpoint; the same model), else
  encoders.initial_dit_params (init.converted or random)."""
  settings = settings_lib.from_config(cfg)
  if not cfg.init.pretrained:
    return encoders.initial_dit_params(settings)
  abstract = jax.eval_shape(lambda: encoders.initial_dit_shapes(settings))
  return jax.tree.map(np.asarray, checkpoint.load_model_params(cfg.init.pretrained, abstract, cfg))


def train(cfg: ml_collections.ConfigDict, workdir: str, *, data=None, norm_stats: dict | None = None,
          stop_at: int | None = None, max_minutes: float | None = None) -> int:
  """Trains towards cfg.train.steps, this run stopping at `stop_at` if given (a later run resumes).

  `max_minutes`: a wall-clock budget for this run (set-up and compilation included); the step that
  crosses it is checkpointed and the run ends there, to be resumed by a later one.

  `data`: an iterator of batches and `norm_stats` the statistics that normalised them (default:
  the grain pipeline over data.dir and that dataset's stats).
  """
  last = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
  deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
  os.makedirs(workdir, exist_ok=True)
  settings = settings_lib.from_config(cfg)
  frozen = encoders.build_frozen_encoders(settings)
  # The checkpoint's config records the trained VAE's digest: evaluation and serving refuse
  # other weights under that path, and resuming on another VAE is refused as incompatible.
  settings = encoders.with_vae_digest(settings)
  if settings.init.vae_sha256 != cfg.init.vae_sha256:
    cfg = cfg.copy_and_resolve_references()
    cfg.init.vae_sha256 = settings.init.vae_sha256
  encode = encoders.BatchEncoder(frozen, settings)
  if data is None:
    rows = None
    if cfg.data.latent_cache:
      encode.cache = latent_cache.build_or_load(cfg, workdir, encode, frozen)
      rows = encode.cache.member_rows
      print(f'latent cache: {len(encode.cache.valid)} clips in {encode.cache.path}')
    data = iter(pipeline.make_dataset(settings, train=True, latent_rows=rows))
    norm_stats = _norm_stats(settings)
  graphdef, abstract = trainer.abstract_train_state(cfg)
  dit_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.eval_shape(lambda s: trainer.full_params(s, cfg.train), abstract)))
  step_fn, to_device, state_sharding = _compiled_step(cfg, graphdef, abstract)

  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    # Straight into the step's shardings: each process reads only the shards it holds.
    target = train_aot.with_shardings(abstract, state_sharding)
    state, data_state, saved_stats = ckpt.restore(start, target, cfg)
    if norm_stats and saved_stats:
      check_resumed_stats(saved_stats, norm_stats, workdir, start)
    norm_stats = saved_stats or norm_stats
    if data_state and hasattr(data, 'set_state'):
      data.set_state(data_state)
    print(f'resumed from {workdir} at step {start}')
  else:
    if cfg.init.converted or cfg.init.pretrained:
      print(f'starting from the weights in {cfg.init.pretrained or cfg.init.converted}')
    params, key = start_params(cfg), jax.random.key(cfg.seed)
    # Parameters go straight into their shards and the optimiser state is built there: no
    # device ever holds the whole state (14B: ~200 GB in fp32 with AdamW).
    base = state_sharding.frozen if cfg.train.lora_rank > 0 else state_sharding.params
    state = jax.jit(lambda p, k: trainer.state_from_params(p, cfg, k), out_shardings=state_sharding)(
        jax.device_put(params, base), key)
  flops, peak = train_flops(cfg, dit_params), peak_flops()
  tokens = trainer.update_batch_size(cfg.train) * train_aot.sequence_length(cfg)[0]
  logger = Logger(workdir, cfg.train.steps, start_step=int(state.step))
  logger.bar.update(int(state.step))
  try:
    while int(state.step) < last:
      batch = next(data)
      check_data_batch(batch, cfg)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, to_device(encode(batch)))
      metrics = {k: float(v) for k, v in metrics.items()}
      seconds = time.perf_counter() - t0
      step = int(state.step)
      bad = [f'{t} is {metrics[t]}' for t in ('video_loss', 'action_loss') if not np.isfinite(metrics[t])]
      if bad or not np.isfinite(metrics['loss']):
        raise NonFiniteLossError(f'step {step}: {", ".join(bad) or "loss is " + str(metrics["loss"])}; stopping, '
                                 f'the last good checkpoint is step {ckpt.latest_step()}')
      metrics.update(samples_per_s=trainer.update_batch_size(cfg.train) / seconds, tokens_per_s=tokens / seconds)
      if peak:
        metrics['mfu'] = flops / seconds / peak
      logger.bar.update(1)
      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        logger.log(step, metrics)
      out_of_time = deadline is not None and time.monotonic() > deadline
      if step % cfg.train.checkpoint_every == 0 or step == last or out_of_time:
        bad, leaves = count_nonfinite_leaves(state)
        if bad:
          last_good = ckpt.latest_step()
          raise NonFiniteLossError(f'step {step}: {bad} of {leaves} parameter/optimiser arrays are not finite '
                                   '(the update diverged: lower train.lr?); not saved, '
                                   + (f'the last good checkpoint is step {last_good}' if last_good is not None
                                      else 'no checkpoint was written'))
        data_state = data.get_state() if hasattr(data, 'get_state') else None
        ckpt.save(step, state, cfg, data_state, norm_stats)
      if out_of_time:
        print(f'time budget of {max_minutes} min reached at step {step}; rerun to resume')
        break
  except NonFiniteLossError as e:
    print(f'error: {e}')
    return 3
  finally:
    logger.close()
    ckpt.close()
  print(f'done: step {int(state.step)}, checkpoints in {os.path.join(workdir, "checkpoints")}')
  return 0

