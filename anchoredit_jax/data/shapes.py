"""ShapesEdit: procedural multi-turn image editing with exact ground truth.

Every scene is a small symbolic description (background + 1-4 objects), so after any edit we know
exactly which pixels had to change (`edit_masks`) and which never changed since the source
(`identity_masks`). That lets training/eval measure drift on "should not change" pixels exactly,
which real editing data never gives us.

Coordinates are image fractions in [0, 1]^2 (x right, y down), so one scene renders to the same
picture at any resolution; `render` only decides the sampling grid.
"""
import dataclasses
import functools
import re

import numpy as np
from PIL import Image

OPS = ("recolour", "move", "resize", "add", "remove")
SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated object colours; backgrounds stay muted (values in ~[0.2, 0.8], low saturation) so
# every palette colour, including white and black, contrasts with every background.
PALETTE = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.70, 0.20), "blue": (0.10, 0.25, 0.95),
    "yellow": (0.98, 0.90, 0.10), "purple": (0.60, 0.15, 0.80), "orange": (1.00, 0.55, 0.00),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "medium", "large")
DIAMETERS = {"small": 0.16, "medium": 0.24, "large": 0.32}
# Moves are exactly a quarter of the side: at res 32 that is 8 px, a whole number of model
# patches, so a moved object lands on the same sub-patch phase it started on.
MOVE_STEP = 0.25
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
RESIZE_DIRECTIONS = ("bigger", "smaller")
# 3x3 grid of named places -> cell centers (x, y) at 1/6, 1/2, 5/6 of the side.
PLACES = {" ".join(w for w in (row, col) if w) or "center": ((2 * j + 1) / 6, (2 * i + 1) / 6)
          for i, row in enumerate(("top", "", "bottom"))
          for j, col in enumerate(("left", "", "right"))}
SPLITS = ("train", "heldout")
BACKGROUNDS = ("procedural", "photo")
# Disjoint photo lists: held-out photos never appear in training sequences.
PHOTOS = {
    "train": ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera",
              "grass"),
    "heldout": ("hubble_deep_field", "retina", "colorwheel", "brick", "gravel"),
}
MIN_RES, MAX_RES, MAX_TURNS, MAX_OBJECTS = 32, 1024, 32, 4
GAP = 0.04      # min empty space between object bounding boxes (>1 px at res 32)
MARGIN = 0.005  # min space between an object's bounding box and the image border
SUPERSAMPLE = 4  # 4x4 samples per pixel for anti-aliased coverage

TEMPLATES = {
    "recolour": ("make the {target} {colour}", "change the colour of the {target} to {colour}",
                 "paint the {target} {colour}", "turn the {target} {colour}"),
    "move": ("move the {target} {direction}", "shift the {target} {towards}",
             "move the {target} {towards}", "nudge the {target} {direction}"),
    "bigger": ("make the {target} bigger", "enlarge the {target}", "grow the {target}"),
    "smaller": ("make the {target} smaller", "shrink the {target}",
                "reduce the size of the {target}"),
    "add": ("add a {size} {colour} {shape} at the {place}", "put a {new} {inplace}",
            "place a {new} {inplace}", "draw a {new} {inplace}"),
    "remove": ("remove the {target}", "delete the {target}", "take away the {target}",
               "erase the {target}"),
}


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  colour: str
  size: str
  cx: float  # center, image fractions
  cy: float

  key = property(lambda self: (self.colour, self.shape))
  radius = property(lambda self: DIAMETERS[self.size] / 2)


@dataclasses.dataclass(frozen=True)
class Background:
  """kind "procedural": params = (c0 rgb, c1 rgb, gradient angle, wave freq xy, phase, tint rgb).
  kind "photo": params = (photo name, x0, y0, side) crop box in photo pixels."""
  kind: str
  params: tuple


@dataclasses.dataclass(frozen=True)
class Scene:
  background: Background
  objects: tuple  # tuple[Obj, ...]

  def find(self, target):
    for i, o in enumerate(self.objects):
      if o.key == tuple(target):
        return i
    raise ValueError(f"target {target!r} matches no object in the scene "
                     f"(have {[o.key for o in self.objects]})")


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edit. `target` is (colour, shape) of an existing object (None for `add`).
  move: direction in left/right/up/down; resize: direction in bigger/smaller;
  recolour: colour; add: colour, shape, size, place."""
  op: str
  target: tuple | None = None
  colour: str | None = None
  shape: str | None = None
  size: str | None = None
  direction: str | None = None
  place: str | None = None

  def __post_init__(self):
    _check_names(self)


def _check(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")


_OP_ARGS = {  # op -> the Edit fields it needs and their allowed values
    "recolour": {"colour": COLOURS}, "move": {"direction": DIRECTIONS},
    "resize": {"direction": RESIZE_DIRECTIONS}, "remove": {},
    "add": {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "place": PLACES},
}


def _check_names(e: Edit):
  _check("op", e.op, OPS)
  if e.op != "add":
    if e.target is None or len(e.target) != 2:
      raise ValueError(f"target must be a (colour, shape) pair for {e.op!r}, got {e.target!r}")
    _check("target colour", e.target[0], COLOURS)
    _check("target shape", e.target[1], SHAPES)
  for field, allowed in _OP_ARGS[e.op].items():
    _check(field, getattr(e, field), allowed)


# ----------------------------------------------------------------------------- geometry

def _inside(o: Obj) -> bool:
  r = o.radius + MARGIN
  return r <= o.cx <= 1 - r and r <= o.cy <= 1 - r


def _apart(a: Obj, b: Obj) -> bool:
  """Bounding boxes separated by GAP on some axis; boxes contain the shapes, so no overlap."""
  d = a.radius + b.radius + GAP
  return abs(a.cx - b.cx) >= d or abs(a.cy - b.cy) >= d


def _fits(o: Obj, others) -> bool:
  return _inside(o) and all(_apart(o, b) for b in others)


def _edited_object(scene: Scene, e: Edit):
  """(index or None, resulting object or None) for an edit, without validity checks."""
  if e.op == "add":
    cx, cy = PLACES[e.place]
    return None, Obj(e.shape, e.colour, e.size, cx, cy)
  i = scene.find(e.target)
  o = scene.objects[i]
  if e.op == "recolour":
    return i, dataclasses.replace(o, colour=e.colour)
  if e.op == "move":
    dx, dy = DIRECTIONS[e.direction]
    return i, dataclasses.replace(o, cx=o.cx + MOVE_STEP * dx, cy=o.cy + MOVE_STEP * dy)
  if e.op == "resize":
    k = SIZES.index(o.size) + (1 if e.direction == "bigger" else -1)
    return i, (dataclasses.replace(o, size=SIZES[k]) if 0 <= k < len(SIZES) else None)
  return i, None  # remove


def _invalid_reason(scene: Scene, e: Edit):
  """None if the edit is valid on this scene, else why not. Raises for unmatched targets."""
  i, new = _edited_object(scene, e)
  others = [o for j, o in enumerate(scene.objects) if j != i]
  if e.op == "remove":
    return None if len(scene.objects) > 1 else "a scene keeps at least one object"
  if e.op == "resize" and new is None:
    return f"no size class {e.direction} than {scene.objects[i].size}"
  if e.op == "add" and len(scene.objects) >= MAX_OBJECTS:
    return f"a scene holds at most {MAX_OBJECTS} objects"
  if new.key in [o.key for o in others] or (e.op == "recolour" and new.key == e.target):
    return f"the result would duplicate or keep the {new.colour} {new.shape}"
  if not _fits(new, others):
    return "the result would leave the image or overlap another object"
  return None


def apply_edit(scene: Scene, edit: Edit) -> Scene:
  """Returns the edited scene; ValueError (naming the field) for bad names or invalid edits."""
  _check_names(edit)
  reason = _invalid_reason(scene, edit)
  if reason is not None:
    raise ValueError(f"edit {edit} is invalid: {reason}")
  i, new = _edited_object(scene, edit)
  objs = list(scene.objects) if i is None else list(scene.objects[:i]) + list(scene.objects[i + 1:])
  if new is not None:  # edited objects keep their slot in the list; added ones go last
    objs.insert(len(objs) if i is None else i, new)
  return dataclasses.replace(scene, objects=tuple(objs))


def _add_options(scene: Scene):
  """Free (colour, shape) pairs and fitting (place, size) spots; any pair x spot is valid."""
  keys = [o.key for o in scene.objects]
  if len(keys) >= MAX_OBJECTS:
    return [], []
  free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in keys]
  spots = [(p, z) for p in PLACES for z in SIZES
           if _fits(Obj("circle", "red", z, *PLACES[p]), scene.objects)]
  return free, spots


def valid_edits(scene: Scene, op: str) -> list:
  """All valid edits of one op on this scene (add: every free (colour, shape) x fitting spot)."""
  _check("op", op, OPS)
  if op == "add":
    free, spots = _add_options(scene)
    return [Edit("add", colour=c, shape=s, size=z, place=p) for c, s in free for p, z in spots]
  options = [{f: v} for f, values in _OP_ARGS[op].items() for v in values] or [{}]  # remove: {}
  cands = [Edit(op, o.key, **kw) for o in scene.objects for kw in options]
  return [e for e in cands if _invalid_reason(scene, e) is None]


def describe(edit: Edit, rng: np.random.Generator) -> str:
  """English instruction for an edit; objects are always named "the <colour> <shape>"."""
  _check_names(edit)
  target = f"{edit.target[0]} {edit.target[1]}" if edit.target is not None else None
  templates = TEMPLATES[edit.direction if edit.op == "resize" else edit.op]
  text = templates[int(rng.integers(len(templates)))]
  inplace = "in the center" if edit.place == "center" else f"at the {edit.place}"
  vertical = edit.direction in ("up", "down")
  towards = f"{edit.direction}wards" if vertical else f"to the {edit.direction}"
  return text.format(target=target, colour=edit.colour, direction=edit.direction, towards=towards,
                     size=edit.size, shape=edit.shape, place=edit.place, inplace=inplace,
                     new=f"{edit.size} {edit.colour} {edit.shape}")


# ----------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
  import skimage.data  # deferred: only photo backgrounds need it
  img = np.asarray(getattr(skimage.data, name)())
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  return Image.fromarray(img[..., :3].astype(np.uint8))


@functools.lru_cache(maxsize=64)
def _grid(res: int):
  t = (np.arange(res, dtype=np.float32) + 0.5) / res  # pixel centers
  return t[None, :], t[:, None]  # x [1, res], y [res, 1]


@functools.lru_cache(maxsize=8)  # small: at res 1024 each entry is 12 MB
def _background(bg: Background, res: int) -> np.ndarray:
  """[res, res, 3] float32; cached because every turn of a sequence shares the background."""
  if bg.kind == "photo":
    name, x0, y0, side = bg.params
    img = _photo(name).resize((res, res), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    # Compress to [0.2, 0.8] so white and black objects always stand out.
    out = 0.2 + 0.6 * np.asarray(img, np.float32) / 255
  else:
    c0, c1, angle, freq, phase, tint = bg.params
    c0, c1, tint = (np.asarray(v, np.float32) for v in (c0, c1, tint))
    x, y = _grid(res)
    ux, uy = np.cos(angle), np.sin(angle)
    lo = min(0.0, ux) + min(0.0, uy)
    t = ((x * ux + y * uy) - lo) / (abs(ux) + abs(uy))  # [res, res] gradient position in [0, 1]
    wave = np.sin(2 * np.pi * (freq[0] * x + freq[1] * y) + phase)  # [res, res]
    out = c0 + (c1 - c0) * t[..., None] + wave[..., None] * tint  # [res, res, 3]
  out = np.clip(out, 0, 1).astype(np.float32)
  out.setflags(write=False)
  return out


def _coverage(o: Obj, res: int):
  """Anti-aliased coverage of one object, only inside its pixel bounding box -> (y0, x0, [h, w])."""
  r, s = o.radius, SUPERSAMPLE
  x0, x1 = max(int(np.floor((o.cx - r) * res)), 0), min(int(np.ceil((o.cx + r) * res)), res)
  y0, y1 = max(int(np.floor((o.cy - r) * res)), 0), min(int(np.ceil((o.cy + r) * res)), res)
  n = res * s
  dx = ((np.arange(x0 * s, x1 * s, dtype=np.float32) + 0.5) / n - o.cx)[None, :] / r
  dy = ((np.arange(y0 * s, y1 * s, dtype=np.float32) + 0.5) / n - o.cy)[:, None] / r
  if o.shape == "circle":
    inside = dx * dx + dy * dy <= 1
  elif o.shape == "square":
    inside = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
  elif o.shape == "diamond":
    inside = np.abs(dx) + np.abs(dy) <= 1
  else:  # triangle: apex at top center, base along the bottom of the box
    inside = (np.abs(dx) <= (dy + 1) / 2) & (dy <= 1)
  h, w = y1 - y0, x1 - x0
  cov = inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)
  return y0, x0, cov


def _check_res(res):
  if not isinstance(res, (int, np.integer)) or not MIN_RES <= res <= MAX_RES:
    raise ValueError(f"res must be an int in [{MIN_RES}, {MAX_RES}], got {res!r}")


def render(scene: Scene, res: int) -> np.ndarray:
  """Scene -> float32 [res, res, 3] in [0, 1], anti-aliased by 4x4 supersampling per pixel."""
  _check_res(res)
  img = _background(scene.background, res).copy()
  for o in scene.objects:
    y0, x0, cov = _coverage(o, res)
    patch = img[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]]  # view: blends in place
    patch += cov[..., None] * (np.asarray(PALETTE[o.colour], np.float32) - patch)
  return img


def to_uint8(img: np.ndarray) -> np.ndarray:
  return np.round(img * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling

def _sample_background(rng, kind, split) -> Background:
  if kind == "photo":
    names = PHOTOS[split]
    name = names[int(rng.integers(len(names)))]
    w, h = _photo(name).size
    side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
    return Background("photo", (name, int(rng.integers(w - side + 1)),
                                int(rng.integers(h - side + 1)), side))
  def muted():
    g = rng.uniform(0.35, 0.65)
    return tuple(float(v) for v in np.clip(g + rng.uniform(-0.08, 0.08, 3), 0, 1))
  freq = tuple(float(v) for v in rng.uniform(-2.0, 2.0, 2))
  tint = tuple(float(v) for v in rng.uniform(-0.04, 0.04, 3))
  return Background("procedural", (muted(), muted(), float(rng.uniform(0, 2 * np.pi)), freq,
                                   float(rng.uniform(0, 2 * np.pi)), tint))


def _sample_scene(rng, kind, split) -> Scene:
  bg = _sample_background(rng, kind, split)
  objs = []
  for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
    keys = [o.key for o in objs]
    free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in keys]
    colour, shape = free[int(rng.integers(len(free)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    r = DIAMETERS[size] / 2 + MARGIN
    for _ in range(50):  # rejection sampling for a free spot; on failure the scene is smaller
      o = Obj(shape, colour, size, *(float(v) for v in rng.uniform(r, 1 - r, 2)))
      if _fits(o, objs):
        objs.append(o)
        break
  return Scene(bg, tuple(objs))


def sample_edit(scene: Scene, rng, ops=None) -> Edit:
  """Uniform op among the allowed ones that have a valid edit, then a uniform valid edit.
  If none of `ops` has a valid edit on this scene, fall back to any op (recolour always works)."""
  for pool in (tuple(ops or OPS), OPS):
    order = [pool[i] for i in rng.permutation(len(pool))]
    for op in order:
      if op == "add":  # sample the product lazily instead of building ~800 Edit objects
        free, spots = _add_options(scene)
        if free and spots:
          k = int(rng.integers(len(free) * len(spots)))
          (c, s), (p, z) = free[k // len(spots)], spots[k % len(spots)]
          return Edit("add", colour=c, shape=s, size=z, place=p)
        continue
      cands = valid_edits(scene, op)
      if cands:
        return cands[int(rng.integers(len(cands)))]
  raise RuntimeError("no valid edit")  # unreachable: recolour always has a free colour


def check_sequence_args(num_turns, res, split="train", ops=None, background="procedural"):
  """ValueError naming the bad field; lets pipelines fail at construction, not in a thread."""
  _check("split", split, SPLITS)
  _check_res(res)
  if not isinstance(num_turns, (int, np.integer)) or not 1 <= num_turns <= MAX_TURNS:
    raise ValueError(f"num_turns must be an int in [1, {MAX_TURNS}], got {num_turns!r}")
  _check("background", background, BACKGROUNDS)
  for op in ops or ():
    _check("ops", op, OPS)


def make_sequence(seed: int, num_turns: int, res: int, split: str = "train", ops=None,
                  background: str = "procedural") -> dict:
  """A deterministic (seed, split) -> multi-turn editing sequence with exact masks.

  Returns images uint8 [T+1, res, res, 3], instructions list[T] of str, ops int32 [T] (index
  into OPS), edit_masks bool [T, res, res] (pixels whose uint8 value changed this turn, so the
  image outside it equals the previous one exactly), identity_masks bool [T, res, res] (pixels
  unchanged in every turn 1..t), scenes list[T+1]. `ops` restricts sampled ops, falling back to any
  op for a turn where none of them is valid. The RNG stream is seeded by (seed, split) so train
  and held-out sequences never coincide.
  """
  check_sequence_args(num_turns, res, split, ops, background)
  if int(seed) < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  rng = np.random.default_rng([int(seed), SPLITS.index(split), 0x5E4A])
  scenes = [_sample_scene(rng, background, split)]
  images = [to_uint8(render(scenes[0], res))]  # each [res, res, 3]
  instructions, op_ids = [], []
  for _ in range(num_turns):
    edit = sample_edit(scenes[-1], rng, ops)
    instructions.append(describe(edit, rng))
    op_ids.append(OPS.index(edit.op))
    scenes.append(apply_edit(scenes[-1], edit))
    images.append(to_uint8(render(scenes[-1], res)))
  images = np.stack(images)  # [T+1, res, res, 3]
  edit_masks = np.any(images[1:] != images[:-1], axis=-1)  # [T, res, res]
  identity_masks = np.logical_and.accumulate(~edit_masks, axis=0)  # [T, res, res]
  return {"images": images, "instructions": instructions, "ops": np.asarray(op_ids, np.int32),
          "edit_masks": edit_masks, "identity_masks": identity_masks, "scenes": scenes}


def make_pair(seed: int, res: int, split: str = "train", **kw) -> dict:
  """One-turn sequence: images [2, res, res, 3] = (source, edited)."""
  return make_sequence(seed, 1, res, split, **kw)


ADD_VERBS = ("add", "put", "place", "draw")


def referent_notice(instruction: str, image: np.ndarray) -> str | None:
  """Why a toy model cannot follow `instruction` on `image` (uint8 [R,R,3]), or None: it names no
  ShapesEdit shape, or the coloured object it edits has no pixel of that colour in the image.
  (An object to add need not be there.)"""
  words = re.findall(r"[a-z]+", instruction.lower())
  shapes = [i for i, w in enumerate(words) if w.rstrip("s") in SHAPES]
  if not shapes:
    return (f"'{instruction}' names none of the shapes the toy model knows "
            f"({', '.join(SHAPES)}); it will edit the image anyway")
  if words[0] in ADD_VERBS:
    return None
  colour = words[shapes[0] - 1] if shapes[0] else None
  if colour not in PALETTE:
    return None
  want = np.asarray(PALETTE[colour]) * 255
  close = np.abs(image.astype(np.float32) - want).max(-1) < 48
  if close.sum() < max(2, image.shape[0] * image.shape[1] // 400):
    return f"'{instruction}': no {colour} object is in the current image"
  return None
