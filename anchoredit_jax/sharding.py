"""Mesh, logical axis names and the rules that map them onto mesh axes.

Models only ever name *logical* axes (the constants below). A config's `sharding.rules` maps each
logical axis to a mesh axis (or None = replicated). Parameters carry their logical names as
metadata from creation (`models.layers.param`); activations are constrained with `constrain`,
which is a no-op when no mesh is active, so the same model code runs on one CPU and on a pod.
"""
import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by the models.
BATCH, LENGTH, EMBED, MLP_, HEADS, KV, LAYERS, VOCAB = (
    "batch", "length", "embed", "mlp", "heads", "kv", "layers", "vocab")

DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (MLP_, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (LAYERS, None),
    (LENGTH, None),
    (VOCAB, None),
)

_ACTIVE = {"mesh": None, "rules": DEFAULT_RULES}


def make_mesh(shape: dict, devices=None) -> Mesh:
  """Mesh over `devices` (default all) with axes (data, fsdp, tensor).

  `shape` gives each axis's size within a slice (data, fsdp, tensor; one may be -1: what is left)
  and, for several slices joined over the data-centre network, `dcn_data`, `dcn_fsdp`,
  `dcn_tensor` (default 1). Axis a then has size a * dcn_a, with the slow links on the outer
  (dcn) part; on CPU and GPU each process counts as a slice."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = [int(shape.get(f"dcn_{a}", 1)) for a in MESH_AXES]
  if min(dcn) < 1 or len(devices) % math.prod(dcn):
    raise ValueError(f"mesh: dcn sizes {dcn} do not divide the {len(devices)} devices")
  per_slice = len(devices) // math.prod(dcn)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  sizes = [per_slice // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != per_slice:
    raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices "
                     f"per slice, there are {per_slice} ({len(devices)} in all, {math.prod(dcn)} "
                     f"slices); set --config.mesh.* so the product matches")
  if math.prod(dcn) == 1:
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}  # CPU/GPU devices are all "slice 0"
  grid = mesh_utils.create_hybrid_device_mesh(
      sizes, dcn, devices, process_is_granule=len(slices) < math.prod(dcn))
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names, rules=None) -> P:
  """('embed', 'mlp') -> P('fsdp', 'tensor') under `rules`; a mesh axis is used at most once."""
  table = dict(rules or _ACTIVE["rules"])
  used, out = set(), []
  for name in names or ():
    axis = table.get(name) if name is not None else None
    axes = tuple(a for a in ((axis,) if isinstance(axis, str) else (axis or ())) if a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def named(mesh, names, rules=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules))


def param_shardings(abstract_state, mesh, rules):
  """NamedSharding for every leaf of an nnx.State whose Params carry `out_sharding`."""
  specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules)), specs,
                      is_leaf=lambda x: isinstance(x, P))


def placed(abstract, shardings):
  """ShapeDtypeStructs of an abstract tree with these shardings (a restore or compile target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def config_rules(cfg) -> tuple:
  """The logical-axis rules of a config (cfg.sharding.rules) as tuples."""
  return tuple(tuple(r) for r in cfg.sharding.rules)


@contextlib.contextmanager
def use_mesh(mesh, rules):
  """Activate a mesh and rules for `constrain` (and jax's own mesh context) inside the block."""
  old = dict(_ACTIVE)
  _ACTIVE.update(mesh=mesh, rules=tuple(tuple(r) for r in rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.update(old)


def platform() -> str:
  """The platform this computation is for: the active mesh's devices (a TPU topology compiled
  ahead of time from a CPU host, say), else the default backend."""
  mesh = _ACTIVE["mesh"]
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def per_shard(fn, in_names, out_names):
  """`fn` run on each device's block of its arguments (shard_map over the active mesh, specs from
  logical names), for kernels the partitioner cannot split itself (Pallas). A dimension that its
  mesh axes do not divide is kept whole. Without a multi-device mesh, `fn` itself."""
  mesh = _ACTIVE["mesh"]
  if mesh is None or mesh.size == 1:
    return fn

  def spec(x, names):
    out = []
    for dim, axes in zip(x.shape, logical_to_spec(names) + (None,) * (x.ndim - len(names))):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      out.append(axes if dim % size == 0 else None)
    return P(*out)

  def run(*args):
    in_specs = tuple(spec(a, n) for a, n in zip(args, in_names))
    probe = jax.eval_shape(fn, *args)  # the output's global shape decides its divisibility
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec(probe, out_names),
                         check_vma=False)(*args)

  return run


def constrain(x, names):
  """Constrain activation `x` to the logical axes `names` (one per dim) under the active mesh."""
  mesh = _ACTIVE["mesh"]
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names)))
