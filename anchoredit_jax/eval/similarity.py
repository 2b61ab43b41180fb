"""Image-similarity metrics of the editing papers (MagicBrush, Emu Edit, ...) on uint8 images
[n,H,W,3]: L1 and L2 to a reference, CLIP-I (image to image), CLIP-T (image to instruction) and
DINO (image to image).

Weights: CLIP and DINOv2 folders downloaded by the user, e.g.
`huggingface-cli download openai/clip-vit-large-patch14 --local-dir clip` and
`huggingface-cli download facebook/dinov2-base --local-dir dinov2`, passed to `Scorer` (by a
flag in the commands). They are read from safetensors (models/clip.py, models/dinov2.py);
nothing is downloaded at run time and pickles are refused. The instruction tokenizer is the CLIP
folder's own, through transformers' AutoTokenizer.

Preprocessing follows each folder's preprocessor_config.json the way transformers' PIL image
processors (CLIPImageProcessor, BitImageProcessor for DINOv2) do it: resize (shortest edge, or to
height x width) with PIL's filter of the config (bicubic), centre crop (zero-padded where the
image is smaller), rescale (in float64, then float32), normalise with image_mean / image_std.

Metrics, each [n] float64 for n pairs:
  l1, l2: mean absolute / squared difference of the pixels scaled to [0, 1];
  clip_i, dino: cosine of the two images' CLIP image embeddings / DINOv2 CLS embeddings;
  clip_t: cosine of the image's CLIP embedding and its instruction's text embedding (raw cosine,
    not the x100 or CLIPScore-style rescalings some papers print).
"""
import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

from anchoredit_jax.data.tokenize import load_tokenizer
from anchoredit_jax.models import vit
from anchoredit_jax.models.clip import LEGACY_EOS, load_clip
from anchoredit_jax.models.dinov2 import load_dinov2

# image processors whose preprocessing this module reproduces, and their class defaults
PROCESSORS = ("CLIPImageProcessor", "CLIPFeatureExtractor", "BitImageProcessor")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def check_images(images, what="images") -> np.ndarray:
  """`images` as a uint8 array [n,H,W,3] with n >= 1; a one-line ValueError otherwise."""
  a = np.asarray(images)
  if a.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8 [n,H,W,3] (0..255), got dtype {a.dtype}")
  if a.ndim != 4 or a.shape[-1] != 3 or 0 in a.shape:
    raise ValueError(f"{what} must be uint8 [n,H,W,3] with n, H, W >= 1, got shape {list(a.shape)}")
  return a


def _pair(a, b, same_size):
  a, b = check_images(a, "output images"), check_images(b, "reference images")
  if (a.shape if same_size else a.shape[:1]) != (b.shape if same_size else b.shape[:1]):
    raise ValueError(f"output images {list(a.shape)} and reference images {list(b.shape)} do not "
                     f"pair up ({'same shape' if same_size else 'same count'} needed)")
  return a, b


def l1(a, b) -> np.ndarray:
  """[n] mean |a - b| of each pair, pixels scaled to [0, 1] (MagicBrush's L1)."""
  a, b = _pair(a, b, True)
  return np.abs(a / 255.0 - b / 255.0).mean(axis=(1, 2, 3))


def l2(a, b) -> np.ndarray:
  """[n] mean (a - b)^2 of each pair, pixels scaled to [0, 1] (MagicBrush's L2)."""
  a, b = _pair(a, b, True)
  return np.square(a / 255.0 - b / 255.0).mean(axis=(1, 2, 3))


def cosine(x, y) -> np.ndarray:
  """[n] cosine similarity of the rows of x [n,d] and y [n,d], in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


# ---------------------------------------------------------------------------- preprocessing


def _size(value, square, source, key):
  """A processor size (an int or a dict) as transformers reads it: {"shortest_edge": s} or
  {"height": h, "width": w}."""
  if isinstance(value, dict):
    value = {k: v for k, v in value.items() if v is not None}
  if isinstance(value, int):
    return {"height": value, "width": value} if square else {"shortest_edge": value}
  if isinstance(value, dict) and set(value) == {"shortest_edge"}:
    return {"shortest_edge": int(value["shortest_edge"])}
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    return {"height": int(value["height"]), "width": int(value["width"])}
  raise ValueError(f"{source}: {key} {value!r} is not ported (an int, shortest_edge, or height and "
                   "width)")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A folder's image preprocessing: uint8 [n,H,W,3] -> float32 [n,h,w,3] model pixels."""
  resize: dict | None = None  # {"shortest_edge": s} or {"height": h, "width": w}; None: kept
  crop: tuple | None = None  # (h, w) of the centre crop; None: none
  resample: int = BICUBIC  # a PIL filter
  rescale: float | None = 1 / 255
  mean: tuple | None = OPENAI_CLIP_MEAN  # mean and std None: not normalised
  std: tuple | None = OPENAI_CLIP_STD

  def _resized(self, image):
    if self.resize is None:
      return image
    h, w = image.shape[:2]
    if "shortest_edge" in self.resize:  # the short side to s, the long one int(s * long / short)
      s, (short, long) = self.resize["shortest_edge"], sorted((h, w))
      size = (int(s * long / short), s) if w <= h else (s, int(s * long / short))
    else:
      size = (self.resize["height"], self.resize["width"])
    return np.asarray(Image.fromarray(image).resize(size[::-1], resample=self.resample))

  def _cropped(self, image):
    if self.crop is None:
      return image
    (h, w), (ch, cw) = image.shape[:2], self.crop
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
      return image[top:top + ch, left:left + cw]
    # smaller than the crop: centred on a zero canvas first, as transformers' center_crop does
    nh, nw = max(ch, h), max(cw, w)
    pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas = np.zeros((nh, nw, image.shape[2]), image.dtype)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]

  def __call__(self, images) -> np.ndarray:
    out = []
    for image in check_images(images):
      x = self._cropped(self._resized(image))
      x = (x.astype(np.float64) * self.rescale).astype(np.float32) if self.rescale is not None \
          else x.astype(np.float32)
      if self.mean is not None:
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
      out.append(x)
    return np.stack(out)


def read_preprocessing(path) -> Preprocessing:
  """The Preprocessing of folder `path`'s preprocessor_config.json (a CLIP or Bit processor's;
  keys it omits take that processor's defaults)."""
  file = Path(path) / "preprocessor_config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found; pass the whole model folder (it ships with its "
                            "preprocessor_config.json)")
  c = vit.read_json(file)
  kind = c.get("image_processor_type") or c.get("feature_extractor_type") or ""
  if kind.removesuffix("Fast").removesuffix("Pil") not in PROCESSORS:
    raise ValueError(f"{file}: image processor {kind!r} is not ported (one of {PROCESSORS})")
  if c.get("do_pad") or c.get("crop_pct") is not None:
    raise ValueError(f"{file}: padding or crop_pct is not ported")
  return Preprocessing(
      resize=_size(c.get("size", 224), False, file, "size") if c.get("do_resize", True) else None,
      crop=(tuple(_size(c.get("crop_size", 224), True, file, "crop_size").values())
            if c.get("do_center_crop", True) else None),
      resample=int(c.get("resample", BICUBIC)),
      rescale=float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else None,
      mean=tuple(c.get("image_mean", OPENAI_CLIP_MEAN)) if c.get("do_normalize", True) else None,
      std=tuple(c.get("image_std", OPENAI_CLIP_STD)) if c.get("do_normalize", True) else None)


# ---------------------------------------------------------------------------- scorer


def _batched(run, params, x, batch_size):
  """run(params, batch) over x in batches of one shape (the last padded by repeating its first
  row), as numpy."""
  n = len(x)
  size = min(batch_size, n)
  out = []
  for i in range(0, n, size):
    part = x[i:i + size]
    if len(part) < size:
      part = np.concatenate([part, np.repeat(part[:1], size - len(part), axis=0)])
    out.append(np.asarray(run(params, part)))
  return np.concatenate(out)[:n]


class Scorer:
  """CLIP-I, CLIP-T and DINO of edited images, from a CLIP folder and/or a DINOv2 folder.

  Each metric takes uint8 images [n,H,W,3]; images go through the model batch_size at a time in
  jitted functions (one compile per batch shape).
  """

  def __init__(self, clip=None, dino=None, *, batch_size=16):
    if clip is None and dino is None:
      raise ValueError("Scorer needs a CLIP folder, a DINOv2 folder or both")
    self.batch_size, self.clip_path, self.dino_path, self._tokenizer = batch_size, clip, dino, None
    if clip is not None:
      graphdef, self._clip_params, self.clip_config = load_clip(clip)
      self._clip_prep = read_preprocessing(clip)
      self._clip_image = jax.jit(lambda p, x: nnx.merge(graphdef, p).image_features(x))
      self._clip_text = jax.jit(lambda p, t: nnx.merge(graphdef, p).text_features(t))
    if dino is not None:
      dino_graphdef, self._dino_params, self.dino_config = load_dinov2(dino)
      self._dino_prep = read_preprocessing(dino)
      self._dino_image = jax.jit(lambda p, x: nnx.merge(dino_graphdef, p)(x))

  def _need(self, which):
    if getattr(self, f"{which}_path") is None:
      raise ValueError(f"this Scorer has no {which.upper()} model; pass {which}=FOLDER")

  def _run(self, run, params, prep, images):
    images = check_images(images)
    pixels = lambda p, part: run(p, prep(part))  # preprocessed a batch at a time, on the host
    return _batched(pixels, params, images, self.batch_size)

  def clip_image_embeddings(self, images) -> np.ndarray:
    """[n,p] CLIP image embeddings (unnormalised) of uint8 images [n,H,W,3]."""
    self._need("clip")
    return self._run(self._clip_image, self._clip_params, self._clip_prep, images)

  def tokens(self, texts) -> np.ndarray:
    """int32 [n, max_position_embeddings] token ids of the instructions, with the folder's
    tokenizer (padded and truncated to the text tower's positions; eos kept)."""
    self._need("clip")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise ValueError("texts must be a list of strings, one instruction an image")
    if not len(texts):
      raise ValueError("no instructions given")
    if empty := [i for i, t in enumerate(texts) if not t.strip()]:
      raise ValueError(f"instructions must be non-empty text; empty at {empty[:5]}")
    if self._tokenizer is None:
      self._tokenizer = load_tokenizer(self.clip_path)
      if self._tokenizer.padding_side != "right":
        side = self._tokenizer.padding_side
        raise ValueError(f"{self.clip_path}: the tokenizer pads on the {side}; CLIP pools at the "
                         "EOS and needs padding on the right")
    text = self.clip_config["text_config"]
    ids = self._tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="np",
                          max_length=text["max_position_embeddings"])["input_ids"]
    eos = text["eos_token_id"]
    if eos != LEGACY_EOS and not (ids == eos).any(axis=1).all():
      raise ValueError(f"{self.clip_path}: the tokenizer does not end every text with "
                       f"eos_token_id {eos} of config.json; the tokenizer and config differ")
    return ids.astype(np.int32)

  def clip_text_embeddings(self, texts) -> np.ndarray:
    """[n,p] CLIP text embeddings (unnormalised) of n instructions."""
    return _batched(self._clip_text, self._clip_params, self.tokens(texts), self.batch_size)

  def dino_embeddings(self, images) -> np.ndarray:
    """[n,d] DINOv2 CLS embeddings (transformers' pooler_output) of uint8 images [n,H,W,3]."""
    self._need("dino")
    return self._run(self._dino_image, self._dino_params, self._dino_prep, images)

  def clip_i(self, out, ref) -> np.ndarray:
    """[n] cosine of the CLIP image embeddings of out[i] and ref[i]."""
    out, ref = _pair(out, ref, False)
    return cosine(self.clip_image_embeddings(out), self.clip_image_embeddings(ref))

  def clip_t(self, out, texts) -> np.ndarray:
    """[n] cosine of out[i]'s CLIP image embedding and texts[i]'s text embedding."""
    out = check_images(out, "output images")
    if isinstance(texts, str) or len(texts) != len(out):
      raise ValueError(f"{len(out)} images need {len(out)} instructions, got "
                       f"{'one string' if isinstance(texts, str) else len(texts)}")
    return cosine(self.clip_image_embeddings(out), self.clip_text_embeddings(texts))

  def dino(self, out, ref) -> np.ndarray:
    """[n] cosine of the DINOv2 CLS embeddings of out[i] and ref[i]."""
    out, ref = _pair(out, ref, False)
    return cosine(self.dino_embeddings(out), self.dino_embeddings(ref))
