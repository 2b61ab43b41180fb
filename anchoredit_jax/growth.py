"""Starting a stage from the one before it: read its parameters, check they belong to this
model, and grow the parts a stage may add over them with zero weights, so the grown model first
computes exactly what the earlier one did (stage 2 learning to use the anchor's latent on top of
a stage-1 run made without it; a copy gate over a run without one).

Stage 1 may start from a Wan2.1 diffusers folder instead (the video prior).
"""
from anchoredit_jax.checkpoint import has_model, load_params, parameter_fields
from anchoredit_jax.convert import wan
from anchoredit_jax.distributed import say
from anchoredit_jax.models.dit import input_channels, output_channels, pad_head, pad_patch_kernel
from anchoredit_jax.models.model import latent_channels

PREVIOUS_STAGE = {"causal": "pretrain", "distill": "causal", "dmd": "distill"}
# other stages a stage may start from: DMD's generator from stage 2 itself, or from a DMD run
# (its regression warm-up, dmd.objective=regression)
ALSO_FROM = {"dmd": ("causal", "dmd")}
# stages whose frozen teacher comes from a run of its own: DMD's real score (dmd.real_from)
TEACHER_FROM = {"dmd": ("dmd.real_from", "causal")}


def _check_source(src, prev, preset, field):
  if not src or wan.is_wan_pipeline(src) or has_model(src):
    return
  ref = f"checkpoints/{preset}/{prev}"
  shipped = f"--config.{field}={ref} (the shipped reference) or " if has_model(ref) else ""
  raise FileNotFoundError(
      f"{field}={src} has no checkpoint; start from {shipped}make it first with: python -m "
      f"anchoredit_jax.train --config=configs/{prev}.py:{preset} --workdir={src}")


def check_init(cfg):
  """Raise FileNotFoundError, naming both ways out, if cfg.init_from (or a teacher's source)
  holds no model to start from."""
  _check_source(cfg.get("init_from"), PREVIOUS_STAGE.get(cfg.stage, "pretrain"), cfg.preset, "init_from")
  if cfg.stage in TEACHER_FROM:
    field, prev = TEACHER_FROM[cfg.stage]
    _check_source(_get(cfg, field), prev, cfg.preset, field)


def _get(cfg, dotted):
  for k in dotted.split("."):
    cfg = cfg[k]
  return cfg


def load_teacher(cfg, mesh=None, rules=None):
  """A stage's frozen teacher from its own run (DMD's real score), or None: the teacher is then
  the run named by init_from (distill)."""
  if cfg.stage not in TEACHER_FROM:
    return None
  field, prev = TEACHER_FROM[cfg.stage]
  return load_init(cfg, mesh, rules, src=_get(cfg, field), stages=(prev,), field=field)


def load_init(cfg, mesh=None, rules=None, *, src=None, stages=None, field="init_from"):
  """Parameters of the earlier stage's run named by cfg.init_from (or `src`, a run of one of
  `stages`), checked against this model, or of a Wan2.1 diffusers folder (stage 1 from the
  video prior)."""
  prev = PREVIOUS_STAGE.get(cfg.stage, "pretrain")
  src = cfg.init_from if src is None else src
  stages = stages or (prev, *ALSO_FROM.get(cfg.stage, ()))
  if wan.is_wan_pipeline(src):
    say(f"initialised from the Wan2.1 weights in {src}")
    return wan.load_wan_pipeline(src, cfg.model, mesh=mesh, rules=rules)
  _check_source(src, stages[0], cfg.preset, field)
  src_cfg, _, params, step = load_params(src, mesh=mesh)
  if src_cfg.get("stage") not in stages:
    raise ValueError(f"{field}={src} is a {src_cfg.get('stage')} run; stage {cfg.stage} takes it "
                     f"from a {' or '.join(stages)} run")
  src_model, our_model = parameter_fields(src_cfg.model), parameter_fields(cfg.model)
  grown = [k for k, off in GROWABLE.items() if src_model[k] == off != our_model[k]]
  free = grown + [d for k in grown for d in GROWN_WITH.get(k, ())] + list(RETUNABLE)
  if {**our_model, **{k: src_model[k] for k in free}} != src_model:
    raise ValueError(f"{field}={src} was trained with another model config than this stage's")
  for k in grown:
    params = GROWABLE_BY[k](params, cfg.model)
  say(f"{'initialised' if field == 'init_from' else field} from {src} step {step}")
  return params


# model fields a stage may turn on over its init_from run: the new weights start at zero, so the
# grown model computes what the earlier one did (e.g. stage 2 learning to use the anchor's latent
# on top of a stage-1 run made without it; a copy gate over a run without one)
GROWABLE = {"concat_anchor": False, "copy_gate": False}
# model fields a stage may set otherwise than its init_from run: no parameters depend on them
RETUNABLE = ("rope_stride",)
# fields that only mean something once a grown part exists, so they are chosen with it
GROWN_WITH = {"copy_gate": ("gate_from",)}


def _grow_anchor(params, model_cfg):
  kernel = params["dit"]["patch_embed"]["kernel"]
  in_ch = input_channels(model_cfg, latent_channels(model_cfg))
  say(f"patch embedding grown to {in_ch} input channels (zero weights for the anchor's latent)")
  kernel.set_value(pad_patch_kernel(kernel.get_value(), model_cfg.patch, in_ch))
  return params


def _grow_gate(params, model_cfg):
  head = params["dit"]["head"]
  out_ch = output_channels(model_cfg, latent_channels(model_cfg))
  say(f"output head grown to {out_ch} channels (a zero-initialised copy gate, nearly closed)")
  for name in ("kernel", "bias"):
    head[name].set_value(pad_head(head[name].get_value(), model_cfg.patch, out_ch))
  return params


GROWABLE_BY = {"concat_anchor": _grow_anchor, "copy_gate": _grow_gate}
