"""Read safetensors checkpoints lazily: memory-mapped, one tensor (or one slice of it) at a time.

safetensors is 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, then
raw little-endian data. Mapping the file and viewing each tensor as a numpy array means that
slicing a tensor reads only the pages that hold the slice, so a host that loads its shard of a
14B model never holds the whole model. bfloat16 comes through `ml_dtypes`, which numpy lacks.
Pickle checkpoints (.pt/.pth/.bin/.ckpt) are refused, never unpickled.
"""
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


def refuse_pickle(path: Path):
  if path.suffix in PICKLE_SUFFIXES:
    raise ValueError(
        f"{path} is a pickle checkpoint, which is never unpickled here; convert it to safetensors "
        f"first: python -c \"import torch, safetensors.torch as s; "
        f"s.save_file(torch.load('{path}', map_location='cpu'), '{path.with_suffix('.safetensors')}')\"")


def checkpoint_files(path, index_glob: str = "*.safetensors.index.json") -> list[Path]:
  """The safetensors files of a checkpoint given as a file, an index JSON or a directory."""
  path = Path(path)
  refuse_pickle(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} not found; pass a .safetensors file, its index JSON "
                            f"or the directory holding them")
  if path.is_file() and path.name.endswith(".json"):
    weight_map = json.loads(path.read_text()).get("weight_map")
    if not weight_map:
      raise ValueError(f"{path} is not a safetensors index (it has no weight_map)")
    return [path.parent / f for f in sorted(set(weight_map.values()))]
  if path.is_file():
    if path.suffix != ".safetensors":
      raise ValueError(f"{path} is not a .safetensors file")
    return [path]
  index = sorted(path.glob(index_glob))
  if index:
    return checkpoint_files(index[0])
  files = sorted(path.glob("*.safetensors"))
  if not files:
    pickles = [p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}")]
    if pickles:
      refuse_pickle(pickles[0])
    raise FileNotFoundError(f"{path} holds no .safetensors files")
  return files


class Tensors:
  """name -> read-only numpy view of a tensor in memory-mapped safetensors files."""

  def __init__(self, files):
    self._where = {}  # name -> (memmap, dtype, shape, begin, end)
    for f in files:
      bad = ValueError(f"{f} could not be read as safetensors (truncated or another format); "
                       f"re-download or re-convert it")
      with open(f, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
          header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
          raise bad from None
      data = np.memmap(f, dtype=np.uint8, mode="r", offset=8 + n)
      if not isinstance(header, dict) or max(
          [i["data_offsets"][1] for k, i in header.items() if k != "__metadata__"], default=0) > data.size:
        raise bad
      for name, info in header.items():
        if name == "__metadata__":
          continue
        if info["dtype"] not in DTYPES:
          raise ValueError(f"{f}: tensor {name} has dtype {info['dtype']}, which is not supported")
        self._where[name] = (data, DTYPES[info["dtype"]], tuple(info["shape"]), *info["data_offsets"])

  def keys(self):
    return self._where.keys()

  def __contains__(self, name):
    return name in self._where

  def shape(self, name) -> tuple:
    return self._where[name][2]

  def __getitem__(self, name) -> np.ndarray:
    data, dtype, shape, begin, end = self._where[name]
    return data[begin:end].view(dtype).reshape(shape)


def open_checkpoint(path) -> Tensors:
  return Tensors(checkpoint_files(path))


def check_keys(want: dict, shapes: dict, source, what: str):
  """Raise one ValueError if the checkpoint's {key: shape} `shapes` is not exactly the model's
  `want`: how many keys are missing, unexpected or of the wrong shape, with the first three."""
  missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
  wrong = [f"{k} {list(shapes[k])} (config: {list(want[k])})" for k in sorted(want)
           if k in shapes and tuple(shapes[k]) != tuple(want[k])]
  if missing or unexpected or wrong:
    problems = [f"{len(v)} {kind} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                for kind, v in (("missing", missing), ("unexpected", unexpected),
                                ("with the wrong shape", wrong)) if v]
    raise ValueError(f"{source} does not match its config: {'; '.join(problems)}; check that "
                     f"config.json and the weights come from the same {what}")
