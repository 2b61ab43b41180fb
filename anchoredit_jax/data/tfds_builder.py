"""TFDS builders: ShapesEdit sequences, or your own multi-turn shards, frozen into array_record.

Procedural data needs no files for training (see pipeline.py), but a frozen copy is useful for
evaluation sets that must stay byte-identical across code changes, and for sharing. Everything
here works without TensorFlow: images are PNG-encoded by PIL, masks are zlib-compressed numpy
tensors, and reading goes through `tfds.data_source` (random access, feeds grain directly).

Example `seed` i of a split equals `shapes.make_sequence(i, num_turns, res, split)`.

`MultiTurnEdits` converts WebDataset shards in the layout of data/wds.py (any size, any number of
turns; samples with defects are left out and counted) for users who prefer TFDS:
  python -m anchoredit_jax.data.tfds_builder --shards '/data/edits/*.tar' --out /data/edits_tfds
and a run trains on it with --config.data.source=tfds --config.data.shards=/data/edits_tfds
(`Frozen` is its source for BucketBatches).
"""
import argparse
import collections
import dataclasses
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from anchoredit_jax import cli
from anchoredit_jax.data import shapes, wds


@dataclasses.dataclass
class ShapesEditConfig(tfds.core.BuilderConfig):
  res: int = 32
  num_turns: int = 4
  num_train: int = 50_000
  num_heldout: int = 1_000
  background: str = "procedural"


class ShapesEdit(tfds.core.GeneratorBasedBuilder):
  """ShapesEdit multi-turn editing sequences with exact edit / identity masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesEditConfig(name="r32_t4", description="res 32, 4 turns", res=32, num_turns=4),
      ShapesEditConfig(name="r64_t8", description="res 64, 8 turns", res=64, num_turns=8,
                       num_train=20_000),
      ShapesEditConfig(name="r32_t2_tiny", description="tiny set for tests", res=32, num_turns=2,
                       num_train=8, num_heldout=4),
  ]
  DEFAULT_CONFIG_NAME = "r32_t4"

  # tfds 4.9.10's default `code_path` probes `importlib_resources` (a py<3.9 backport that is not
  # installed); our module is a plain file, so point at it directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    r, t = c.res, c.num_turns
    masks = lambda: tfds.features.Tensor(shape=(t, r, r), dtype=np.bool_,
                                         encoding=tfds.features.Encoding.ZLIB)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "seed": tfds.features.Scalar(dtype=np.int64),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(r, r, 3)),
                                             length=t + 1),        # [T+1, res, res, 3] uint8
            "instructions": tfds.features.Sequence(tfds.features.Text(), length=t),  # [T]
            "ops": tfds.features.Tensor(shape=(t,), dtype=np.int32),             # [T]
            "edit_masks": masks(),                                              # [T, res, res]
            "identity_masks": masks(),                                          # [T, res, res]
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: all data is procedural
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "heldout": self._generate_examples("heldout", c.num_heldout)}

  def _generate_examples(self, split, num):
    c = self.builder_config
    for seed in range(num):
      seq = shapes.make_sequence(seed, c.num_turns, c.res, split, background=c.background)
      yield seed, {
          "seed": seed,
          # PIL images: tfds PNG-encodes them with PIL (numpy arrays would need tf.image).
          "images": [Image.fromarray(im) for im in seq["images"]],
          "instructions": seq["instructions"],
          "ops": seq["ops"],
          "edit_masks": seq["edit_masks"],
          "identity_masks": seq["identity_masks"],
      }


def build(data_dir: str, config_name: str = "r32_t2_tiny") -> tfds.core.DatasetBuilder:
  """Generates (once) the array_record files for one config under data_dir; returns the builder."""
  builder = ShapesEdit(config=config_name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder


def data_source(data_dir: str, config_name: str, split: str):
  """Random-access source over a built split; elements are dicts of numpy arrays (no TF)."""
  builder = ShapesEdit(config=config_name, data_dir=data_dir, file_format="array_record")
  return builder.as_data_source(split=split)


def decode_example(ex: dict) -> dict:
  """Data-source element -> the make_sequence layout: images stacked uint8 [T+1, res, res, 3],
  instructions as str (tfds returns bytes and a list of images)."""
  out = dict(ex)
  out["images"] = np.stack([np.asarray(im) for im in ex["images"]])
  out["instructions"] = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
                         for t in ex["instructions"]]
  return out


@dataclasses.dataclass
class MultiTurnConfig(tfds.core.BuilderConfig):
  shards: str = ""  # a glob or a {"resolved_files": [...]} JSON (data/wds.py)


class MultiTurnEdits(tfds.core.GeneratorBasedBuilder):
  """Multi-turn editing samples from WebDataset shards: images, and the instructions in English
  and Chinese (each falling back to the other where one is missing)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  skipped: collections.Counter = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    texts = lambda: tfds.features.Sequence(tfds.features.Text())
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "key": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
            "en": texts(), "zh": texts()}),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(wds.shard_list(self.builder_config.shards))}

  def _generate_examples(self, paths):
    self.skipped = collections.Counter()
    source = wds.Source(paths)
    for i in range(len(source)):
      raw = source[i]
      sample, defects = wds.parse(raw, language="en")
      self.skipped.update(defects)
      if sample is None:
        continue
      yield f"{i:09d}", {"key": sample["key"], "images": [Image.fromarray(im) for im in sample["images"]],
                         "en": sample["instructions"], "zh": wds.texts(raw, "zh")}


class Frozen:
  """A built MultiTurnEdits split as a source for BucketBatches (records split between processes
  p, p + P, ...); nothing in it is defective, but turns are still cut to max_turns."""

  def __init__(self, data_dir, process_index=0, process_count=1, split="train"):
    if not os.path.isdir(os.path.join(data_dir, "multi_turn_edits")):
      raise FileNotFoundError(f"{data_dir} holds no converted shards; make them with python -m "
                              "anchoredit_jax.data.tfds_builder --shards ... --out " + data_dir)
    builder = MultiTurnEdits(config=MultiTurnConfig(name="own"), data_dir=data_dir,
                             file_format="array_record")
    self.records = builder.as_data_source(split=split)
    self.index = range(process_index, len(self.records), process_count)
    self.corrupt_shards, self.where = 0, data_dir

  def __len__(self):
    return len(self.index)

  def sample(self, i, *, language="en", max_turns=None, exact_turns=False):
    ex = self.records[self.index[i]]
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t in ex[language]]
    turns, defects = wds.kept_turns(len(texts), max_turns, exact_turns)
    if turns is None:
      return None, defects
    return {"key": self.describe(i), "images": [np.asarray(im) for im in ex["images"][:turns + 1]],
            "instructions": texts[:turns]}, defects

  def describe(self, i) -> str:
    return f"record {self.index[i]} of {self.where}"


def convert(shards: str, out: str) -> tuple:
  """Build MultiTurnEdits from `shards` under `out`: (records written, Counter of skipped kinds)."""
  if os.path.isdir(os.path.join(out, "multi_turn_edits")):
    raise ValueError(f"{out} already holds converted shards; give a new --out (or delete "
                     f"{os.path.join(out, 'multi_turn_edits')} to convert again)")
  builder = MultiTurnEdits(config=MultiTurnConfig(name="own", shards=shards), data_dir=out,
                           file_format="array_record")
  builder.download_and_prepare()
  return builder.info.splits["train"].num_examples, builder.skipped or collections.Counter()


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--shards", required=True, help="a glob of .tar shards or a JSON shard list")
  ap.add_argument("--out", required=True, help="TFDS data_dir to build into")
  args = cli.parse_args(ap, argv)
  try:
    n, skipped = convert(args.shards, args.out)
  except (ValueError, OSError) as e:
    print(f"tfds_builder: error: {e}", file=sys.stderr)
    return 2
  print(f"{n} samples in {args.out}" + "".join(f"; skipped {v} ({k})" for k, v in sorted(skipped.items())))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
