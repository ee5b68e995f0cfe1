"""Camera views pasted into one 2x2 canvas frame (DESIGN.md section 4), with augmentation.

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

LAYOUTS = ('droid', 'grid')


@dataclasses.dataclass(frozen=True)
class Augment:
  """Per-view augmentation drawn once per clip (the same crop and colour for every frame)."""
  crop_scale: float = 1.0    # smallest kept fraction of each side; 1 = no crop
  brightness: float = 0.0    # added offset drawn from [-b, b] (pixels in [-1, 1])
  contrast: float = 0.0      # gain drawn from [1-c, 1+c]


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
                box: tuple[float, float, float, float] | None, table: np.ndarray | None = None) -> np.ndarray:
  """Decodes one frame, crops `box` (fractions of the image), resizes to `size` (h, w) and maps
  every pixel value through `table` (uint8 [256]) if given."""
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
  return np.asarray(im) if table is None else np.take(table, np.asarray(im))


def draw_augment(rng: np.random.Generator, aug: Augment, num_views: int):
  """(crop boxes, brightness offsets, contrast gains) for each view."""
  boxes, offsets, gains = [], [], []
  for _ in range(num_views):
    s = rng.uniform(aug.crop_scale, 1.0)
    x0, y0 = rng.uniform(0.0, 1.0 - s, size=2)
    boxes.append((x0, y0, x0 + s, y0 + s) if s < 1.0 else None)
    offsets.append(rng.uniform(-aug.brightness, aug.brightness))
    gains.append(rng.uniform(1.0 - aug.contrast, 1.0 + aug.contrast))
  return boxes, offsets, gains


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

  `rng` None means evaluation: no crop, no colour change. Frames past T are left untouched.
  """
  num_t, (height, width) = len(frames[0]), out.shape[1:3]
  places = placements(layout, len(frames), height, width)
  pixels_u8 = np.zeros((num_t, height, width, 3), np.uint8)   # black where no view goes
  if rng is None:
    boxes, offsets, gains = [None] * len(frames), [0.0] * len(frames), [1.0] * len(frames)
  else:
    boxes, offsets, gains = draw_augment(rng, aug, len(frames))
  for v, (row, col, h, w, rep) in enumerate(places):
    table = None
    if offsets[v] or gains[v] != 1.0:
      # Colour jitter in pixel space (gain about mid-grey, offset in [-1, 1] units), clipped.
      jitter = np.clip((np.arange(256) - 127.5) * gains[v] + 127.5 + offsets[v] * 127.5, 0, 255)
      table = np.round(jitter).astype(np.uint8)
    for t, f in enumerate(frames[v]):
      _paste(pixels_u8, t, row, col, decode_view(f, (h, w), image_shapes[v], boxes[v], table), rep)
  to_float(pixels_u8, out=out[:num_t])


def compose_arrays(views: list[np.ndarray], layout: str, height: int, width: int) -> np.ndarray:
  """Camera frames views[v] uint8 [T, h, w, 3] (any size) -> canvas float32 [T, H, W, 3] in [-1, 1].

  The inference-side twin of `compose`: the policy server receives raw arrays, not encoded bytes.
  """
  num_t = views[0].shape[0]
  pixels_u8 = np.zeros((num_t, height, width, 3), np.uint8)
  for view, (row, col, h, w, rep) in zip(views, placements(layout, len(views), height, width)):
    if view.shape[1:3] != (h, w):
      view = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in view])
    _paste(pixels_u8, slice(None), row, col, view, rep)
  return to_float(pixels_u8)
