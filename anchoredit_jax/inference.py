"""Multi-turn editing with a trained run: one compiled function per turn, the memory in and out.

  session = EditSession.from_run("checkpoints/toy/distill", source_uint8)   # or a run directory
  img = session.edit("make the red circle blue")      # uint8 [R,R,3]
  session.save("s.npz")
  session = EditSession.load("s.npz", *checkpoint.load_params("checkpoints/toy/distill")[:3])

`edit_turn` samples the new turn (the 4-step consistency student, or the N-step Euler teacher with
classifier-free guidance), writes it into the AnchorMemory and decodes it. It is jitted with the
memory donated and every shape static, so turn 2 and turn 200 run the same compiled code. The
noise of turn i is `fold_in(key(seed), i)`: a session saved and resumed gives the same turns as
one that never stopped. `sample_turn` and `write_image` are its two halves apart (the sample
without the write; a given image written as the turn), for the oracle-context benchmark.
"""
import dataclasses
import functools
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.checkpoint import check_config_fields, config_fields, load_params
from anchoredit_jax.errors import short
from anchoredit_jax.data.tokenize import tokenize_for
from anchoredit_jax.editing import (concat_text, empty_tokens, encode, generate_turn, generate_turn_fast,
                                    write_turn)
from anchoredit_jax.models.model import init_memory, prev_cond
from anchoredit_jax.stages.pretrain import velocity

EDIT_STAGES = ("causal", "distill", "dmd")
STUDENT_STAGES = ("distill", "dmd")  # few-step students: consistency distillation, DMD


@dataclasses.dataclass(frozen=True)
class Sampler:
  """student: few-step consistency sampler (no CFG); teacher: Euler with CFG. noise_sign -1
  negates every noise draw (the multi-turn benchmark's antithetic turns)."""
  kind: str = "student"
  steps: int = 4
  guidance: float = 1.0
  shift: float = 3.0
  noise_sign: float = 1.0


def default_sampler(cfg, teacher_steps: int = 50) -> Sampler:
  """The distilled student for stage-3 runs, the N-step CFG teacher for stage-2 runs."""
  if cfg.stage in STUDENT_STAGES:
    return Sampler("student", student_steps(cfg), 1.0, cfg.flow.shift)
  return Sampler("teacher", teacher_steps, cfg.eval.guidance, cfg.flow.shift)


def student_steps(cfg, default: int = 4) -> int:
  """The few-step sampler's steps of a stage-3 config (distill or dmd), else `default`."""
  return cfg[cfg.stage].student_steps if cfg.get("stage") in STUDENT_STAGES else default


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "guidance", "shift"))
def sample_single(params, graphdef, src_images, tokens, rng, *, steps, guidance, shift):
  """One edit of src_images uint8 [b,R,R,3] by tokens [b,l] as stage 1 learns it (no memory; the
  source is the previous turn), Euler + CFG -> [b,R,R,3] in [0,1]."""
  model = nnx.merge(graphdef, params)
  ae = model.autoencoder
  src = ae.encode(src_images)
  text, uncond = encode(model, tokens), encode(model, jnp.broadcast_to(empty_tokens(model.cfg), tokens.shape))
  empty = uncond if model.cfg.source_context else None

  def velocity_fn(x, t, guided):
    tb = jnp.full((x.shape[0],), t)
    if not guided:
      return velocity(model, src, x, tb, text, empty)
    two = lambda a: jnp.concatenate([a, a], axis=0)
    v = velocity(model, two(src), two(x), two(tb), concat_text(text, uncond),
                 None if empty is None else concat_text(empty, empty))
    return jnp.split(v, 2, axis=0)

  x0 = flow.euler_sample(velocity_fn, jax.random.normal(rng, src.shape), steps=steps, shift=shift,
                         guidance=guidance)
  return ae.decode(x0)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("mem",))
def start_memory(params, graphdef, mem, image):
  """Write the source image uint8 [b,R,R,3] into an empty memory (it becomes the anchor)."""
  model = nnx.merge(graphdef, params)
  b = image.shape[0]
  empty = jnp.broadcast_to(empty_tokens(model.cfg), (b, model.cfg.text_len))
  return _write_image(model, mem, image, empty)


def _write_image(model, mem, image, tokens):
  return write_turn(model, mem, model.autoencoder.encode(image), encode(model, tokens))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("mem",))
def write_image(params, graphdef, mem, image, tokens):
  """Write a given image uint8 [b,R,R,3] into the memory as the turn of instruction tokens [b,l],
  as edit_turn writes its own sample: the oracle-context benchmark writes the ground truth."""
  return _write_image(nnx.merge(graphdef, params), mem, image, tokens)


def _sample(model, mem, tokens, rng, s: Sampler):
  """(clean latent x0 [b,H,W,C], Text) of a new turn from the memory, not written into it."""
  text = encode(model, tokens)  # once per turn, shared by every sampler step and the write
  if s.kind == "student":
    return generate_turn_fast(model, mem, text, rng, steps=s.steps, shift=s.shift,
                              sign=s.noise_sign), text
  empty = encode(model, jnp.broadcast_to(empty_tokens(model.cfg), tokens.shape))
  return generate_turn(model, mem, text, empty, rng, steps=s.steps, guidance=s.guidance,
                       shift=s.shift, sign=s.noise_sign), text


def one_turn(params, graphdef, mem, tokens, rng, *, sampler: Sampler):
  """One editing turn: tokens int32 [b,l] -> (image float [b,R,R,3] in [0,1], new memory)."""
  model = nnx.merge(graphdef, params)
  x0, text = _sample(model, mem, tokens, rng, sampler)
  mem = write_turn(model, mem, x0, text)
  return jnp.clip(model.autoencoder.decode(x0), 0.0, 1.0), mem


_STATIC = ("graphdef", "sampler")
edit_turn = jax.jit(one_turn, static_argnames=_STATIC, donate_argnames=("mem",))
# the same turn with the old memory kept (an edit tree branches from it again)
edit_turn_kept = jax.jit(one_turn, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler"))
def sample_turn(params, graphdef, mem, tokens, rng, *, sampler: Sampler):
  """edit_turn's image [b,R,R,3] in [0,1] without writing the turn (the memory is not donated)."""
  model = nnx.merge(graphdef, params)
  return jnp.clip(model.autoencoder.decode(_sample(model, mem, tokens, rng, sampler)[0]), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "shift"))
def bidirectional_turn(params, graphdef, history, history_tokens, tokens, rng, *, steps, shift):
  """The baseline AnchorEdit replaces: a new turn from a full-attention re-run over the whole
  history at every sampler step (no memory; cost grows with the turn). history [b,t,H,W,C] clean
  latents (the source first), history_tokens [b,t,l], tokens [b,l] -> x0 [b,H,W,C]."""
  model = nnx.merge(graphdef, params)
  b, t = history.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(t + 1), (b, t + 1))
  text = model.encode_text(jnp.concatenate([history_tokens, tokens[:, None]], 1))  # once per turn
  cond = (prev_cond(jnp.concatenate([history, history[:, -1:]], 1), model.cfg.concat_anchor)
          if model.cfg.concat_prev else None)

  def x0_fn(x, time_):
    xs = jnp.concatenate([history, x[:, None]], 1)
    ts = jnp.concatenate([jnp.zeros((b, t)), jnp.full((b, 1), time_)], 1)
    v = model(xs, ts, text, pos, cond=cond, causal=False)[0][:, -1]
    return flow.x0_from_velocity(x, v, jnp.full((b,), time_))

  r0, r1 = jax.random.split(rng)
  return flow.consistency_sample(x0_fn, jax.random.normal(r0, history.shape[:1] + history.shape[2:]),
                                 r1, steps=steps, shift=shift)


def tree_bytes(tree) -> int:
  """Bytes of every array in a pytree (a memory, a history)."""
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def to_uint8(x):
  return np.asarray(np.round(np.asarray(x) * 255.0), np.uint8)


def instruction_tokens(cfg, instruction: str):
  """One instruction -> int32 [1, text_len]; a non-string or empty one is refused by name."""
  if not isinstance(instruction, str):
    raise TypeError(f"an instruction is a string, e.g. 'make the red circle blue'; got "
                    f"{type(instruction).__name__} {instruction!r:.40}")
  if not instruction.strip():
    raise ValueError("empty instruction: say what to change, e.g. 'make the red circle blue'")
  return jnp.asarray(tokenize_for(cfg.model, [instruction]))


def check_source(cfg, source) -> np.ndarray:
  """The source image as this run edits it: uint8 [R,R,3], else a ValueError naming the shape."""
  source = np.asarray(source)
  res = cfg.data.res
  if source.shape != (res, res, 3) or source.dtype != np.uint8:
    raise ValueError(f"source image must be uint8 [{res},{res},3], got {source.dtype} {list(source.shape)}")
  return source


def load_edit_run(workdir):
  """(cfg, graphdef, params) of a run or reference checkpoint that can edit (stage 2 or 3)."""
  try:
    cfg, graphdef, params, _ = load_params(workdir)
  except (FileNotFoundError, ValueError):  # ours: they say what is wrong
    raise
  except Exception as e:  # noqa: BLE001  (orbax/tensorstore errors when the arrays do not fit the config)
    raise ValueError(f"the checkpoint in {workdir} does not match its config.json "
                     f"({type(e).__name__}: {short(e, 120)})") from e
  if cfg.get("stage") not in EDIT_STAGES:
    raise ValueError(f"{workdir} is a {cfg.get('stage')} run; editing sessions need a causal "
                     f"(stage 2), distill or dmd (stage 3) run")
  return cfg, graphdef, params


def source_memory(cfg, graphdef, params, source, window=None):
  """A batch-1 AnchorMemory holding the source image uint8 [R,R,3] (window: cfg.causal.window)."""
  mem = init_memory(cfg.model, 1, cfg.data.res, window or cfg.causal.window, use_anchor=cfg.causal.anchor)
  return start_memory(params, graphdef, mem, jnp.asarray(source[None]))


def memory_from_leaves(cfg, window, leaves, where):
  """A batch-1 AnchorMemory rebuilt from its saved leaves (in jax.tree.leaves order); a ValueError
  naming `where` if they do not fit this model."""
  like = init_memory(cfg.model, 1, cfg.data.res, window, use_anchor=cfg.causal.anchor)
  if [a.shape for a in jax.tree.leaves(like)] != [tuple(a.shape) for a in leaves]:
    raise ValueError(f"{where} was saved with another model config than this run's")
  return jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(a, l.dtype) for a, l in
                                                       zip(leaves, jax.tree.leaves(like))])


class EditSession:
  """An editing session on one image: `.edit(instruction)`, `.history`, `.save` / `.load`."""

  def __init__(self, cfg, graphdef, params, source, *, sampler=None, seed=0, window=None):
    source = check_source(cfg, source)
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.sampler = sampler or default_sampler(cfg)
    self.seed = seed
    self.history = [("", source)]  # (instruction, uint8 image) per turn, the source first
    self.memory = source_memory(cfg, graphdef, params, source, window)

  @classmethod
  def from_run(cls, workdir, source, **kw):
    return cls(*load_edit_run(workdir), source, **kw)

  @property
  def turn(self) -> int:
    return len(self.history) - 1

  def tokens(self, instruction: str):
    return instruction_tokens(self.cfg, instruction)

  def edit(self, instruction: str) -> np.ndarray:
    """Apply one instruction; returns the new image uint8 [R,R,3]."""
    tokens = self.tokens(instruction)
    rng = jax.random.fold_in(jax.random.key(self.seed), self.turn + 1)
    image, self.memory = edit_turn(self.params, self.graphdef, self.memory, tokens, rng,
                                   sampler=self.sampler)
    out = to_uint8(image[0])
    self.history.append((instruction, out))
    return out

  def save(self, path, *, overwrite=False):
    """Memory, history and sampler in one .npz file (the model weights are not included), with
    the stage and model fields it needs back. Written to a temporary file, then renamed."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
      raise ValueError(f"{path}: a session is saved as one .npz file; give a path ending in .npz")
    if os.path.exists(path) and not overwrite:
      raise ValueError(f"{path} exists; pass overwrite=True or choose another path")
    leaves = {f"mem_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(self.memory))}
    meta = {"seed": self.seed, "sampler": dataclasses.asdict(self.sampler),
            "instructions": [h[0] for h in self.history], "window": self.memory.window,
            "stage": self.cfg.get("stage"), "config_fields": config_fields(self.cfg)}
    tmp = path[:-4] + ".partial.npz"
    try:
      np.savez(tmp, images=np.stack([h[1] for h in self.history]), meta=json.dumps(meta), **leaves)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path, cfg, graphdef, params):
    """Resume a saved session with the same run's weights."""
    try:
      with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        images = f["images"]
        leaves = [f[f"mem_{i}"] for i in range(sum(k.startswith("mem_") for k in f.files))]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # missing, cut short, not a session
      raise ValueError(f"{path} is not a readable saved session ({short(e, 100)})") from e
    if meta.get("stage", cfg.get("stage")) != cfg.get("stage"):
      raise ValueError(f"{path} was saved by a {meta['stage']} model; load it with that model's "
                       f"weights, not a {cfg.get('stage')} model's")
    check_config_fields(f"the session {path}", cfg, meta.get("config_fields"), only="model.",
                        against="this model", fix="load it with the model it was made with")
    self = cls.__new__(cls)
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.sampler, self.seed = Sampler(**meta["sampler"]), meta["seed"]
    self.history = list(zip(meta["instructions"], images))
    self.memory = memory_from_leaves(cfg, meta["window"], leaves, path)
    return self
