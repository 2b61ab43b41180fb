"""Aspect-ratio buckets: the (height, width) shapes real images are cropped and resized to.

`hw_buckets(base)` lists the shapes whose area is at most base**2, with sides that are multiples
of `step` and a long/short ratio of at most `max_ratio`, walked along the area limit from tall to
wide (the authors' construction; 49 shapes at base 1024, step 64, ratio 4). A sample goes to the
bucket nearest its aspect ratio (then nearest its area), and each of its images is centre-cropped
to that ratio and resized. Batches are formed per (turns, height, width), so each compiled train
step sees one static shape: at most len(buckets) x (distinct turn counts) step variants.
"""
import numpy as np
from PIL import Image


def hw_buckets(base: int, step: int = 64, max_ratio: float = 4.0) -> list:
  """[(h, w)] with h * w <= base**2, h and w multiples of `step`, max(h, w) / min(h, w) <=
  max_ratio, from the tallest to the widest."""
  if base < step or base % step:
    raise ValueError(f"bucket base {base} must be a positive multiple of the step {step}")
  area = base * base
  out, h, w = [], area // step // step * step, step
  while h >= step:
    if max(h, w) / min(h, w) <= max_ratio:
      out.append((h, w))
    if h * (w + step) <= area:
      w += step
    else:
      h -= step
  return out


def pick(h: int, w: int, buckets) -> tuple:
  """The bucket of least aspect-ratio error for an h x w image, ties to the nearest area."""
  r = h / max(w, 1)
  return min(buckets, key=lambda b: (abs(r - b[0] / b[1]), abs(h * w - b[0] * b[1])))


def crop_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3]: the largest centred crop of ratio h/w, resized bicubic."""
  H, W = img.shape[:2]
  if H * w > W * h:  # taller than the target: keep the width
    ch, cw = max(1, min(H, round(W * h / w))), W
  else:
    ch, cw = H, max(1, min(W, round(H * w / h)))
  top, left = (H - ch) // 2, (W - cw) // 2
  crop = Image.fromarray(img[top:top + ch, left:left + cw])
  return np.asarray(crop.resize((w, h), Image.BICUBIC) if (ch, cw) != (h, w) else crop)
