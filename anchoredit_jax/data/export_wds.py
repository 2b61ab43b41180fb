"""Write ShapesEdit sequences as multi-turn WebDataset shards, the layout your own data comes in.

  python -m anchoredit_jax.data.export_wds --out /data/shapes_wds --sequences 1000 --turns 5

One format serves both: a run with --config.data.source=wds --config.data.shards='DIR/*.tar'
trains on these exactly as on your own shards (data/wds.py). Each sample is `<key>.0.png` (the
source), `<key>.1.png` ... (the turns) and `<key>.json` {"instructions": [{"en": ...}, ...]};
the key is `<split>_<seed>`, a shard is named by its first seed. Shards are written whole or
not at all, so an interrupted export rerun with the same flags writes only the shards that are
missing, and another --first adds shards beside them.
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

from anchoredit_jax import cli
from anchoredit_jax.data import shapes, wds


def sample(seed: int, turns: int, res: int, split: str) -> dict:
  seq = shapes.make_sequence(seed, turns, res, split)
  return {"key": f"{split}_{seed:08d}", "images": list(seq["images"]),
          "instructions": list(seq["instructions"])}


def export(out, *, sequences, turns, res, split="train", per_shard=1000, first=0) -> list:
  """Write the shards to `out` (skipping complete ones); their paths, and shards.json beside."""
  shapes.check_sequence_args(turns, res, split, None, "procedural")
  if sequences < 1 or per_shard < 1:
    raise ValueError("--sequences and --per-shard must be >= 1")
  os.makedirs(out, exist_ok=True)
  spec = {"turns": turns, "res": res, "per_shard": per_shard}
  meta = os.path.join(out, f"{split}.export.json")  # shards of other turns/res are not reused
  if os.path.exists(meta):
    with open(meta) as f:
      before = json.load(f)
    if before != spec:
      raise ValueError(f"{out} holds {split} shards exported with {before}, not {spec}; give "
                       "another --out")
  else:
    with open(meta, "w") as f:
      json.dump(spec, f)
  paths = []
  starts = range(first, first + sequences, per_shard)
  for start in tqdm(starts, desc="shards", unit="shard"):
    path = os.path.join(out, f"{split}-{start:09d}.tar")  # named by its first seed
    if not os.path.exists(path):
      stop = min(start + per_shard, first + sequences)
      wds.write_shard(path, (sample(s, turns, res, split) for s in range(start, stop)))
    paths.append(path)
  with open(os.path.join(out, "shards.json.tmp"), "w") as f:
    json.dump({"resolved_files": [os.path.basename(p) for p in paths]}, f, indent=1)
  os.replace(os.path.join(out, "shards.json.tmp"), os.path.join(out, "shards.json"))
  return paths


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--out", required=True, help="folder for the .tar shards and shards.json")
  ap.add_argument("--sequences", type=int, default=1000)
  ap.add_argument("--turns", type=int, default=5, help="edits per sequence")
  ap.add_argument("--res", type=int, default=32)
  ap.add_argument("--split", default="train", help="train | heldout")
  ap.add_argument("--per-shard", type=int, default=1000, help="sequences per shard")
  ap.add_argument("--first", type=int, default=0, help="seed of the first sequence")
  args = cli.parse_args(ap, argv)
  try:
    paths = export(args.out, sequences=args.sequences, turns=args.turns, res=args.res,
                   split=args.split, per_shard=args.per_shard, first=args.first)
  except (ValueError, OSError) as e:
    print(f"export_wds: error: {e}", file=sys.stderr)
    return 2
  print(f"{args.sequences} sequences in {len(paths)} shard(s): {os.path.join(args.out, 'shards.json')}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
