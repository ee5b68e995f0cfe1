"""Camera views pasted into one 2x2 canvas frame (docs/model.md), cropped and augmented.

Layouts (canvas H x W, quadrants H/2 x W/2):
  'droid': cameras (wrist, exterior 1, exterior 2): the wrist view fills the top row (resized to
           H/2 x W/2, then each pixel repeated twice horizontally), exterior 1 bottom-left,
           exterior 2 bottom-right.
  'grid':  view 0 top-left, view 2 top-right, view 1 bottom-left, bottom-right black.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from dreamzero_jax.embodiments import LAYOUTS


@dataclasses.dataclass(frozen=True)
class Augment:
  """Per-view preprocessing as the release's transform/video.py does it, drawn once per clip (the same
  crop and colour for every frame of a view). The crop applies in training (at a random place) and in
  evaluation and serving (centred); the colour jitter only in training."""
  crop_scale: float = 1.0    # the crop keeps this fraction of each side (int(h * s) x int(w * s))
  brightness: float = 0.0    # factor from [1-b, 1+b] (torchvision ColorJitter); 0 = off
  contrast: float = 0.0      # factor from [1-c, 1+c], blended with the frame's mean grey
  saturation: float = 0.0    # factor from [1-s, 1+s], blended with the pixel's grey
  hue: float = 0.0           # shift from [-h, h] of a turn


def placements(layout: str, num_views: int, height: int, width: int):
  """(row, col, view_h, view_w, repeat_w) for each view in camera order."""
  h, w = height // 2, width // 2
  if layout == 'droid':
    if num_views != 3:
      raise ValueError(f'data.cameras: the droid canvas needs 3 cameras, got {num_views}')
    return [(0, 0, h, w, 2), (h, 0, h, w, 1), (h, w, h, w, 1)]
  if layout == 'grid':
    if not 1 <= num_views <= 3:
      raise ValueError(f'data.cameras: the grid canvas takes 1 to 3 cameras, got {num_views}')
    return [(0, 0, h, w, 1), (h, 0, h, w, 1), (0, w, h, w, 1)][:num_views]
  raise ValueError(f'data.canvas_layout: unknown layout {layout!r} (known: {", ".join(LAYOUTS)})')


def decode_view(encoded: bytes, size: tuple[int, int], expect: tuple[int, int],
                box: tuple[float, float, float, float] | None) -> np.ndarray:
  """Decodes one frame, crops `box` (fractions of the image) and resizes to `size` (h, w)."""
  im = Image.open(io.BytesIO(encoded))
  if (im.size[1], im.size[0]) != tuple(expect):
    raise ValueError(f'{im.size[1]}x{im.size[0]} image, the dataset declares {expect[0]}x{expect[1]}')
  full_w, full_h = im.size
  if box is None:
    box = (0.0, 0.0, 1.0, 1.0)
  # JPEG decodes straight at 1/2, 1/4, 1/8 scale when the target is that much smaller; the crop
  # is then taken at that scale (a crop upsamples by at most 1/crop_scale: fine for augmentation).
  im.draft('RGB', (size[1], size[0]))
  sx, sy = im.size[0] / full_w, im.size[1] / full_h
  pixel_box = (box[0] * full_w * sx, box[1] * full_h * sy, box[2] * full_w * sx, box[3] * full_h * sy)
  im = im.convert('RGB')
  if im.size != (size[1], size[0]) or pixel_box != (0, 0, im.size[0], im.size[1]):
    im = im.resize((size[1], size[0]), Image.BILINEAR, box=pixel_box)
  return np.asarray(im)


def crop_box(shape: tuple[int, int], scale: float, rng: np.random.Generator | None):
  """The crop of a (h, w) image as fractions (x0, y0, x1, y1): int(h * scale) x int(w * scale) pixels
  at a random place (rng) or centred (None, torchvision CenterCrop's rounding); None = no crop."""
  if scale >= 1.0:
    return None
  h, w = shape
  ch, cw = int(h * scale), int(w * scale)
  if rng is None:
    y0, x0 = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
  else:
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  return x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h


@dataclasses.dataclass(frozen=True)
class Jitter:
  """One view's colour jitter: factors, hue shift and the order the four are applied in."""
  brightness: float = 1.0
  contrast: float = 1.0
  saturation: float = 1.0
  hue: float = 0.0
  order: tuple[int, ...] = (0, 1, 2, 3)

  @property
  def identity(self) -> bool:
    return (self.brightness, self.contrast, self.saturation, self.hue) == (1.0, 1.0, 1.0, 0.0)


def draw_jitter(rng: np.random.Generator, aug: Augment) -> Jitter:
  """torchvision ColorJitter's draw: each factor uniform in [max(0, 1-x), 1+x], hue in [-h, h], and a
  random order of the four adjustments."""
  factor = lambda x: float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x)) if x else 1.0
  return Jitter(factor(aug.brightness), factor(aug.contrast), factor(aug.saturation),
                float(rng.uniform(-aug.hue, aug.hue)) if aug.hue else 0.0,
                tuple(int(i) for i in rng.permutation(4)))


def _grey(x: np.ndarray) -> np.ndarray:
  return (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _shift_hue(x: np.ndarray, shift: float) -> np.ndarray:
  """RGB in [0, 1] -> HSV, hue + shift (mod 1), -> RGB."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(-1), x.min(-1)
  delta = maxc - minc
  safe = np.where(delta > 0, delta, 1.0)
  sat = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  h = (h + shift) % 1.0
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  v = maxc
  p, q, t = v * (1.0 - sat), v * (1.0 - sat * f), v * (1.0 - sat * (1.0 - f))
  i = i.astype(np.int32) % 6
  choose = lambda *c: np.select([i == k for k in range(6)], c)
  return np.stack([choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)], -1)


def apply_jitter(frames: np.ndarray, jitter: Jitter) -> np.ndarray:
  """uint8 frames [T, h, w, 3] of one view -> jittered uint8 (each frame's contrast about its own
  mean grey, as torchvision does per image)."""
  if jitter.identity:
    return frames
  x = frames.astype(np.float32) / 255.0
  for op in jitter.order:
    if op == 0 and jitter.brightness != 1.0:
      x = np.clip(x * jitter.brightness, 0.0, 1.0)
    elif op == 1 and jitter.contrast != 1.0:
      mean = _grey(x).mean(axis=(-3, -2, -1), keepdims=True)
      x = np.clip(jitter.contrast * x + (1.0 - jitter.contrast) * mean, 0.0, 1.0)
    elif op == 2 and jitter.saturation != 1.0:
      x = np.clip(jitter.saturation * x + (1.0 - jitter.saturation) * _grey(x), 0.0, 1.0)
    elif op == 3 and jitter.hue != 0.0:
      x = _shift_hue(x, jitter.hue)
  return np.round(x * 255.0).astype(np.uint8)


def to_float(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1] (x * 2/255 - 1, in float32), into `out` if given."""
  out = np.multiply(pixels, np.float32(2.0 / 255.0), out=out, dtype=np.float32)
  return np.subtract(out, np.float32(1.0), out=out)


def _paste(pixels: np.ndarray, t, row: int, col: int, view: np.ndarray, rep: int) -> None:
  """pixels[t, row:row+h, col:col+w*rep] = view with each pixel repeated `rep` times across."""
  h, w = view.shape[-3:-1]
  dst = pixels[t, row:row + h, col:col + w * rep]
  if rep == 1:
    dst[...] = view
  else:
    dst.reshape(*dst.shape[:-2], w, rep, 3)[...] = view[..., None, :]


def compose(frames: list[list[bytes]], layout: str, out: np.ndarray,
            image_shapes: list[tuple[int, int]], rng: np.random.Generator | None,
            aug: Augment) -> None:
  """Writes frames[v][t] (encoded) as canvas frames out[t] (float32 [T', H, W, 3], T' >= T) in [-1, 1].

  `rng` None means evaluation: the centred crop, no colour change. Frames past T are left untouched.
  """
  num_t, (height, width) = len(frames[0]), out.shape[1:3]
  places = placements(layout, len(frames), height, width)
  pixels_u8 = np.zeros((num_t, height, width, 3), np.uint8)   # black where no view goes
  for v, (row, col, h, w, rep) in enumerate(places):
    box = crop_box(image_shapes[v], aug.crop_scale, rng)
    view = np.stack([decode_view(f, (h, w), image_shapes[v], box) for f in frames[v]])
    if rng is not None:
      view = apply_jitter(view, draw_jitter(rng, aug))
    _paste(pixels_u8, slice(None), row, col, view, rep)
  to_float(pixels_u8, out=out[:num_t])


def compose_arrays(views: list[np.ndarray], layout: str, height: int, width: int,
                   crop_scale: float = 1.0) -> np.ndarray:
  """Camera frames views[v] uint8 [T, h, w, 3] (any size) -> canvas float32 [T, H, W, 3] in [-1, 1].

  The inference-side twin of `compose` (evaluation preprocessing: the centred crop, no jitter): the
  policy server receives raw arrays, not encoded bytes.
  """
  num_t = views[0].shape[0]
  pixels_u8 = np.zeros((num_t, height, width, 3), np.uint8)
  for view, (row, col, h, w, rep) in zip(views, placements(layout, len(views), height, width)):
    box = crop_box(view.shape[1:3], crop_scale, None)
    if view.shape[1:3] != (h, w) or box is not None:
      vh, vw = view.shape[1:3]
      pixel_box = None if box is None else (box[0] * vw, box[1] * vh, box[2] * vw, box[3] * vh)
      view = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR, box=pixel_box))
                       for f in view])
    _paste(pixels_u8, slice(None), row, col, view, rep)
  return to_float(pixels_u8)
