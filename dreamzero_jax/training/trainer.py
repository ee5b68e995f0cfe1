"""The train step: optimiser, full fine-tuning or LoRA (models/lora.py), EMA, gradient accumulation, sharding.

State is a pytree of plain arrays (TrainState) so it jits, shards and checkpoints as is; the
model's graph (nnx.GraphDef) stays outside and is merged with the parameters inside the step.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from dreamzero_jax import settings as settings_lib
from dreamzero_jax import sharding
from dreamzero_jax.models.dit import DreamZeroDiT, build_dit
from dreamzero_jax.models.lora import Params, init_lora, merge_lora
from dreamzero_jax.training import objective


class TrainState(NamedTuple):
  step: jax.Array           # int32 []
  params: Params            # trainable: all DiT params, or the LoRA factors
  frozen: Params | None     # the frozen base under LoRA, else None
  opt_state: Any
  rng: jax.Array            # uint32 key data [2]
  ema: Params | None        # EMA of `params` when train.ema_decay > 0


def learning_rate(cfg_train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup over train.warmup_fraction of the steps, then cosine decay to 0."""
  warmup = int(cfg_train.warmup_fraction * cfg_train.steps)
  if warmup == 0:
    return optax.cosine_decay_schedule(cfg_train.lr, max(cfg_train.steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, cfg_train.lr, warmup, max(cfg_train.steps, warmup + 1))


def make_optimizer(cfg_train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg_train.grad_clip),
      optax.adamw(learning_rate(cfg_train), b1=cfg_train.b1, b2=cfg_train.b2, weight_decay=cfg_train.weight_decay))


def update_batch_size(cfg_train: ml_collections.ConfigDict) -> int:
  """Examples in one optimiser update (global): batch_size per micro-batch x grad_accum_steps."""
  return cfg_train.batch_size * cfg_train.grad_accum_steps


# ---- state and step ------------------------------------------------------------------------------

def model_params(model: DreamZeroDiT) -> tuple[nnx.GraphDef, Params]:
  graphdef, state = nnx.split(model)
  return graphdef, state.to_pure_dict()


def full_params(state: TrainState, cfg_train) -> Params:
  if state.frozen is None:
    return state.params
  return merge_lora(state.frozen, state.params, cfg_train.lora_alpha, cfg_train.lora_rank)


def init_train_state(model: DreamZeroDiT, cfg: ml_collections.ConfigDict, rng: jax.Array
                     ) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params = model_params(model)
  return graphdef, state_from_params(params, cfg, rng)


def state_from_params(params: Params, cfg: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """The step-0 TrainState around the DiT's parameters (pure, so it can be jitted with output
  shardings: a pod builds the optimiser state directly in its shards)."""
  frozen = None
  if cfg.train.lora_rank > 0:
    frozen, params = params, init_lora(params, cfg.train.lora_targets, cfg.train.lora_rank, rng)
  tx = make_optimizer(cfg.train)
  # A copy, not the same buffers: the train step donates the state, and a buffer cannot be donated twice.
  ema = jax.tree.map(jnp.copy, params) if cfg.train.ema_decay > 0 else None
  return TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params),
                    jax.random.key_data(jax.random.fold_in(rng, 1)), ema)


def abstract_train_state(cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, TrainState]:
  """The graph and the TrainState's shapes, without materialising parameters (for restores)."""
  model = settings_lib.from_config(cfg).model
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_dit(model, rngs=nnx.Rngs(0))))
  state = jax.eval_shape(lambda: init_train_state(build_dit(model, rngs=nnx.Rngs(0)), cfg,
                                                  jax.random.key(0))[1])
  return graphdef, state


def make_train_step(graphdef: nnx.GraphDef, cfg: ml_collections.ConfigDict):
  """(state, LatentBatch) -> (state, metrics); pure, jit it with donated state.

  The step's noise comes from (state.rng, state.step), so a resumed run draws what an
  uninterrupted one would.
  """
  update = make_update(graphdef, cfg)

  def step(state: TrainState, batch: objective.LatentBatch):
    return update(state, batch, jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))

  return step


def make_update(graphdef: nnx.GraphDef, cfg: ml_collections.ConfigDict):
  """(state, LatentBatch, rng) -> (state, metrics): one optimiser update with the given noise.

  The batch holds update_batch_size examples. With train.grad_accum_steps = k > 1 it is run as k
  micro-batches of train.batch_size (micro-batch i takes examples i, i + k, ...: a batch sharded
  by rows stays sharded) whose gradients and metrics are averaged before the one update. Each
  example keeps its noise (objective.example_noise), so with equally sized masks the update equals
  one over the whole batch at once.
  """
  tx = make_optimizer(cfg.train)
  schedule = learning_rate(cfg.train)
  k = cfg.train.grad_accum_steps

  def loss_fn(params, frozen, batch, rng, index):
    full = params if frozen is None else merge_lora(frozen, params, cfg.train.lora_alpha, cfg.train.lora_rank)
    return objective.flow_matching_loss(nnx.merge(graphdef, full), batch, rng, cfg.train, index)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, frozen, batch, rng):
    rows = batch.latents.shape[0]
    if k == 1:
      (_, metrics), grads = grad_fn(params, frozen, batch, rng, jnp.arange(rows))
      return grads, metrics
    if rows % k:
      raise ValueError(f'a batch of {rows} examples does not split into train.grad_accum_steps={k} micro-batches')
    micro = jax.tree.map(lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
    index = jnp.arange(rows).reshape(rows // k, k).T

    def body(acc, xs):
      mb, idx = xs
      (_, metrics), grads = grad_fn(params, frozen, mb, rng, idx)
      return jax.tree.map(lambda a, g: a + g / k, acc, (grads, metrics)), None

    (_, metrics), grads = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro), rng, index[0])
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads, metrics))
    return jax.lax.scan(body, zeros, (micro, index))[0]

  def update(state: TrainState, batch: objective.LatentBatch, rng: jax.Array):
    grads, metrics = gradients(state.params, state.frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      d = cfg.train.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return update


# ---- sharding ------------------------------------------------------------------------------------

def abstract_model(cfg: ml_collections.ConfigDict) -> nnx.Module:
  """The DiT with ShapeDtypeStruct leaves: shapes and logical axes, no memory (instant for 14B)."""
  model = settings_lib.from_config(cfg).model
  return nnx.eval_shape(lambda: build_dit(model, rngs=nnx.Rngs(0)))


def train_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh, abstract_state: TrainState,
                    abstract_batch: objective.LatentBatch):
  """(state shardings, batch shardings) over `mesh` with cfg.mesh.rules (sharding.train_state_specs)."""
  sizes, rules = dict(mesh.shape), sharding.config_rules(cfg)
  specs = sharding.train_state_specs(abstract_state, abstract_model(cfg), make_optimizer(cfg.train), rules, sizes)
  return sharding.named(mesh, specs), sharding.named(mesh, sharding.batch_specs(abstract_batch, rules, sizes))


def compiled_train_step(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, abstract_state: TrainState,
                        abstract_batch: objective.LatentBatch):
  """(step, to_device, state shardings) of the train step over cfg's mesh (sharding.config_mesh:
  one device is a mesh of one, so a workstation and a pod run one program). `step(state, batch)` is
  jitted with the state donated; `to_device(batch)` turns this host's batch into the step's global
  batch (multi-host: each host feeds its own rows); the state shardings say where a restored or new
  state goes."""
  mesh = sharding.config_mesh(cfg)
  state_sh, batch_sh = train_shardings(cfg, mesh, abstract_state, abstract_batch)
  step = sharding.shard_train_step(make_train_step(graphdef, cfg), mesh, state_sh, batch_sh,
                                   sharding.config_rules(cfg))
  return step, lambda batch: sharding.global_batch(batch, batch_sh), state_sh
