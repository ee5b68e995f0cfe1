"""Block-causal chunk masks from token-group rules (docs/model.md).

Every token carries a group (what it is) and a chunk index (which chunk it belongs to). A mask is
a short list of rules "queries of group A may see keys of group B when the chunk relation holds";
a query sees a key if any rule allows it. The same rules give the teacher-forcing mask, the mask
of one inference step against the KV cache, and (with BIDIRECTIONAL_RULES) the bidirectional
ablation.

Video latent frames map to chunks as: frame 0 is its own group (the conditioning frame); frame f
>= 1 belongs to chunk (f - 1) // frames_per_chunk.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Group(enum.IntEnum):
  PAD = 0       # padding: sees only other padding, seen by nobody else
  CLEAN0 = 1    # clean (observed) latent frame 0
  CLEAN = 2     # clean latent frames of chunk i
  NOISY0 = 3    # the noisy copy of frame 0 (teacher forcing only)
  NOISY = 4     # noisy latent frames of chunk i
  ACTION = 5    # action tokens of chunk i
  STATE = 6     # the state token(s) of chunk i


class Rule(NamedTuple):
  query: Group
  key: Group
  relation: str  # 'any' | 'same' | 'before' (key chunk < query chunk) | 'upto' (key chunk <= query chunk)


_RELATIONS = {
    'any': lambda q, k: (q == q) & (k == k),
    'same': lambda q, k: q == k,
    'before': lambda q, k: k < q,
    'upto': lambda q, k: k <= q,
}

_DENOISED = (Group.NOISY, Group.ACTION)

BLOCK_CAUSAL_RULES: tuple[Rule, ...] = (
    Rule(Group.PAD, Group.PAD, 'any'),
    Rule(Group.CLEAN0, Group.CLEAN0, 'any'),
    Rule(Group.CLEAN, Group.CLEAN0, 'any'),
    Rule(Group.CLEAN, Group.CLEAN, 'upto'),
    Rule(Group.NOISY0, Group.NOISY0, 'any'),
    Rule(Group.STATE, Group.STATE, 'same'),
    *(Rule(q, Group.CLEAN0, 'any') for q in _DENOISED),
    *(Rule(q, Group.CLEAN, 'before') for q in _DENOISED),
    *(Rule(q, k, 'same') for q in _DENOISED for k in (Group.NOISY, Group.ACTION, Group.STATE)),
)

# The AR-vs-bidirectional ablation: the whole clip is denoised jointly, so every noisy, action and
# state token sees every other one and the conditioning frame; the clean copies of later frames
# (teacher forcing's history) would leak the targets, so nothing but themselves sees them.
_JOINT = (Group.CLEAN0, Group.NOISY0, Group.NOISY, Group.ACTION, Group.STATE)
BIDIRECTIONAL_RULES: tuple[Rule, ...] = (
    Rule(Group.PAD, Group.PAD, 'any'),
    Rule(Group.CLEAN, Group.CLEAN0, 'any'),
    Rule(Group.CLEAN, Group.CLEAN, 'any'),
    *(Rule(q, k, 'any') for q in _JOINT for k in _JOINT),
)

RULES = {'block_causal': BLOCK_CAUSAL_RULES, 'bidirectional': BIDIRECTIONAL_RULES}

# What a state query sees when a chunk is denoised against the KV cache (model.inference_state_attention):
# 'self': itself only, as in training (the cached rollout then equals the teacher-forcing forward);
# 'all': the official release's cached forward, one unmasked attention in which the state token,
#   like the chunk's noisy video and actions, sees the whole cache and every new token
#   (docs/fidelity.md). Only the block-causal rules have a cache to read; bidirectional is unchanged.
INFERENCE_STATE_ATTENTION = ('all', 'self')
_STATE_SEES_ALL: tuple[Rule, ...] = (
    Rule(Group.STATE, Group.CLEAN0, 'any'),
    Rule(Group.STATE, Group.CLEAN, 'before'),
    *(Rule(Group.STATE, k, 'same') for k in (Group.NOISY, Group.ACTION)),
)


class TokenLayout(NamedTuple):
  """Per-token group and chunk ids of a sequence (numpy: layouts are static)."""
  group: np.ndarray   # int8 [L]
  chunk: np.ndarray   # int32 [L]

  @staticmethod
  def concat(*layouts: 'TokenLayout') -> 'TokenLayout':
    arrays = [a for l in layouts for a in l]
    xp = jnp if any(isinstance(a, jnp.ndarray) for a in arrays) else np
    return TokenLayout(xp.concatenate([xp.asarray(l.group, np.int8) for l in layouts]),
                       xp.concatenate([xp.asarray(l.chunk, np.int32) for l in layouts]))

  def __len__(self) -> int:
    return len(self.group)

  def shifted(self, chunks) -> 'TokenLayout':
    """The same groups with chunk ids moved by `chunks` (may be traced)."""
    return TokenLayout(self.group, self.chunk + chunks)


def segment(group: Group, chunk: np.ndarray | int, count: int = 1) -> TokenLayout:
  """`count` tokens for each entry of `chunk`, all of one group."""
  chunk = np.atleast_1d(np.asarray(chunk, np.int32))
  return TokenLayout(np.full(chunk.size * count, group, np.int8), np.repeat(chunk, count))


def video_layout(frames: np.ndarray | range, tokens_per_frame: int, frames_per_chunk: int,
                 clean: bool) -> TokenLayout:
  """Layout of latent frames `frames` (absolute frame indices), tokens_per_frame each."""
  parts = []
  for f in frames:
    if f == 0:
      parts.append(segment(Group.CLEAN0 if clean else Group.NOISY0, 0, tokens_per_frame))
    else:
      parts.append(segment(Group.CLEAN if clean else Group.NOISY, (f - 1) // frames_per_chunk,
                           tokens_per_frame))
  return TokenLayout.concat(*parts)


def teacher_forcing_layout(num_chunks: int, latent_frames_per_chunk: int, tokens_per_frame: int,
                           action_horizon: int, state_tokens: int = 1) -> TokenLayout:
  """[clean video | noisy video | K*horizon actions | K states] (docs/model.md)."""
  frames = range(1 + num_chunks * latent_frames_per_chunk)
  chunks = np.arange(num_chunks)
  return TokenLayout.concat(
      video_layout(frames, tokens_per_frame, latent_frames_per_chunk, clean=True),
      video_layout(frames, tokens_per_frame, latent_frames_per_chunk, clean=False),
      segment(Group.ACTION, chunks, action_horizon),
      segment(Group.STATE, chunks, state_tokens))


def inference_layout(chunk: int, latent_frames_per_chunk: int, tokens_per_frame: int,
                     action_horizon: int, state_tokens: int = 1) -> TokenLayout:
  """One denoising step's queries: [noisy chunk | actions | state] of chunk `chunk`."""
  frames = range(1 + chunk * latent_frames_per_chunk, 1 + (chunk + 1) * latent_frames_per_chunk)
  return TokenLayout.concat(
      video_layout(frames, tokens_per_frame, latent_frames_per_chunk, clean=False),
      segment(Group.ACTION, chunk, action_horizon),
      segment(Group.STATE, chunk, state_tokens))


def pad_layout(layout: TokenLayout, length: int) -> TokenLayout:
  """Appends PAD tokens up to `length` (e.g. a block multiple for flash attention)."""
  extra = length - len(layout)
  if extra < 0:
    raise ValueError(f'layout of {len(layout)} tokens does not fit in {length}')
  return TokenLayout.concat(layout, segment(Group.PAD, np.zeros(extra, np.int32)))


def mask_from_rules(queries: TokenLayout, keys: TokenLayout,
                    rules: tuple[Rule, ...] = BLOCK_CAUSAL_RULES):
  """Boolean [Lq, Lk]: True where the query may attend to the key.

  Works on numpy layouts (a static mask) and on jax arrays (chunk ids may be traced, as at
  inference where the chunk index moves); the result has the layouts' array type.
  """
  xp = jnp if any(isinstance(a, jnp.ndarray) for a in (*queries, *keys)) else np
  qg, qc = xp.asarray(queries.group)[:, None], xp.asarray(queries.chunk)[:, None]
  kg, kc = xp.asarray(keys.group)[None, :], xp.asarray(keys.chunk)[None, :]
  mask = xp.zeros((len(queries.group), len(keys.group)), bool)
  for rule in rules:
    mask = mask | ((qg == rule.query) & (kg == rule.key) & _RELATIONS[rule.relation](qc, kc))
  return mask


def attention_mask(queries: TokenLayout, keys: TokenLayout, kind: str = 'block_causal',
                   state_attention: str = 'self'):
  """The mask of `kind`; `state_attention` ('self' | 'all') is the inference rule for state queries."""
  if kind not in RULES:
    raise ValueError(f'unknown attention mask kind {kind!r} (known: {", ".join(RULES)})')
  if state_attention not in INFERENCE_STATE_ATTENTION:
    raise ValueError(f'model.inference_state_attention={state_attention!r}: expected one of '
                     f'{", ".join(INFERENCE_STATE_ATTENTION)}')
  rules = RULES[kind]
  if state_attention == 'all' and kind == 'block_causal':
    rules = rules + _STATE_SEES_ALL
  return mask_from_rules(queries, keys, rules)
