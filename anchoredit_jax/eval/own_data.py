"""The multi-turn benchmark on your own validation shards (data/wds.py's layout), scored with the
metrics editing papers report, since real data has no exact edit masks.

Per turn, for each system's output against the sample's ground-truth turn: L1 and L2 (MagicBrush),
PSNR, CLIP-I and DINO; against the instruction: CLIP-T; against the source: CLIP-I and DINO of the
source (`clip_i_source`, `dino_source`: the drift measures of multi-turn papers). CLIP and DINOv2
come from local folders (eval/similarity.py); without them only the pixel metrics are computed.
Every statistic is a mean over sequences with its bootstrap 95% interval.

Letters: N sequences, T turns, R resolution, b batch.
"""
import numpy as np

from anchoredit_jax.data import buckets, wds
from anchoredit_jax.data.tokenize import tokenize_batch
from anchoredit_jax.eval import similarity, stats

PIXEL = ("l1", "l2", "psnr")
BY_MODEL = {"clip": ("clip_i", "clip_t", "clip_i_source"), "dino": ("dino", "dino_source")}
# the drift plot's panels, in this order where computed: identity first, then the edit
PLOTTED = ("dino_source", "clip_i_source", "clip_t", "l1", "psnr")
# what each metric compares, for the tables
MEANING = {"l1": "L1 to the ground-truth turn (MagicBrush; lower is closer)",
           "l2": "L2 to the ground-truth turn (lower is closer)",
           "psnr": "PSNR to the ground-truth turn, dB",
           "clip_i": "CLIP-I to the ground-truth turn", "clip_t": "CLIP-T to the instruction",
           "clip_i_source": "CLIP-I to the source (identity)", "dino": "DINO to the ground-truth turn",
           "dino_source": "DINO to the source (identity)"}


def sequences(spec: str, n: int, turns: int, res: int, text_len: int, tokenizer="bytes",
              language="en") -> dict:
  """The first `n` samples of the shards with at least `turns` turns (cut to `turns`), every image
  centre-cropped to a square and resized to res x res: images uint8 [N,T+1,R,R,3], tokens
  [N,T,l], instructions [N][T] (str), keys [N]."""
  source = wds.Source(wds.shard_list(spec))
  rows = []
  for i in range(len(source)):
    sample, _ = wds.parse(source[i], max_turns=turns, exact_turns=True, language=language)
    if sample is not None:
      rows.append(sample)
    if len(rows) == n:
      break
  if not rows:
    raise ValueError(f"no sample in {spec} has {turns} turns and reads cleanly; lower --turns")
  return {"images": np.stack([np.stack([buckets.crop_resize(im, res, res) for im in r["images"]])
                              for r in rows]),
          "tokens": np.stack([tokenize_batch(r["instructions"], text_len, tokenizer) for r in rows]),
          "instructions": [r["instructions"] for r in rows], "keys": [r["key"] for r in rows]}


def metric_names(scorer) -> tuple:
  """The metrics computed with this scorer (None: the pixel ones only)."""
  names = list(PIXEL)
  if scorer is not None:
    names += [m for model, ms in BY_MODEL.items() if getattr(scorer, f"{model}_path") is not None for m in ms]
  return tuple(names)


def score_turn(pred, target, source, instructions, scorer=None) -> dict:
  """One turn's metrics {name: [b]} of outputs `pred` float [b,R,R,3] in [0,1] (rounded to uint8,
  as they are saved) against target and source uint8 [b,R,R,3] and the instructions [b]."""
  out = np.asarray(np.round(np.clip(np.asarray(pred), 0.0, 1.0) * 255.0), np.uint8)
  m = {"l1": similarity.l1(out, target), "l2": similarity.l2(out, target)}
  m["psnr"] = np.minimum(10.0 * np.log10(1.0 / np.maximum(m["l2"], 1e-12)), 60.0)
  if scorer is not None and scorer.clip_path is not None:
    m.update(clip_i=scorer.clip_i(out, target), clip_t=scorer.clip_t(out, list(instructions)),
             clip_i_source=scorer.clip_i(out, source))
  if scorer is not None and scorer.dino_path is not None:
    m.update(dino=scorer.dino(out, target), dino_source=scorer.dino(out, source))
  return m


def turn_stats(m, seed=0) -> dict:
  """{name: {"value", "ci"}} per turn with bootstrap intervals, and the number of sequences."""
  N = len(next(iter(m.values())))
  return {"sequences": int(N), **{k: stats.mean_turns(v, seed=seed) for k, v in m.items()}}
