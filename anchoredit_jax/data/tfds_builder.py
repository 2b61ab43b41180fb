"""TFDS builder that freezes ShapesEdit sequences into array_record files.

Procedural data needs no files for training (see pipeline.py), but a frozen copy is useful for
evaluation sets that must stay byte-identical across code changes, and for sharing. Everything
here works without TensorFlow: images are PNG-encoded by PIL, masks are zlib-compressed numpy
tensors, and reading goes through `tfds.data_source` (random access, feeds grain directly).

Example `seed` i of a split equals `shapes.make_sequence(i, num_turns, res, split)`.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from anchoredit_jax.data import shapes


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
