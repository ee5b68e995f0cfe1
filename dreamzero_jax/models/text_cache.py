"""Prompt embeddings computed once per distinct prompt, so training never re-encodes an instruction.

Robot datasets repeat a small set of instructions across thousands of episodes, and the text
encoder is frozen: an embedding is a pure function of the prompt string. Rows are kept on the host
trimmed to the prompt's true length (a 10-token prompt stores 10 rows, not text_len) and padded
back with zeros on the way out, matching the encoder's own zeroing past the length.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Encode = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


class PromptCache:
  """`prompts -> [B, text_len, dim]` through `encode`, calling it only for prompts not seen before.

  `encode(prompts)` returns embeddings [B, text_len, dim] (zero past each length) and lengths [B],
  e.g. `umt5.prompt_encoder(model, tokenizer)`.
  """

  def __init__(self, encode: Encode):
    self._encode = encode
    self._rows: dict[str, np.ndarray] = {}
    self._shape: tuple[int, int] | None = None   # (text_len, dim), known after the first encode
    self._dtype = None

  def __len__(self) -> int:
    return len(self._rows)

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    if not prompts:
      raise ValueError('PromptCache: no prompts given')
    missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
    if missing:
      embeddings, lengths = self._encode(missing)
      embeddings = np.asarray(embeddings)
      self._shape, self._dtype = embeddings.shape[1:], embeddings.dtype
      for prompt, rows, length in zip(missing, embeddings, np.asarray(lengths)):
        self._rows[prompt] = rows[:int(length)].copy()
    out = np.zeros((len(prompts), *self._shape), self._dtype)
    for i, prompt in enumerate(prompts):
      rows = self._rows[prompt]
      out[i, :len(rows)] = rows
    return out
