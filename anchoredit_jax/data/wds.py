"""Multi-turn editing data in WebDataset tar shards (the authors' layout), read by random access.

A sample is the tar members that share a key: `<key>.0.<ext>` (the source), `<key>.1.<ext>` ...
`<key>.N.<ext>` (the N turns, numbered without gaps; ext one of jpg, jpeg, png, webp, any case)
and `<key>.json` holding {"instructions": [{"en": ..., "zh": ...}, ...]}, one entry per turn (a
plain string per turn is read as that text in every language). A shard list is a JSON file
{"resolved_files": [...]} (relative paths from the file's folder), a glob, or several globs
separated by commas.

Shards are split between processes (process p reads shards p, p + P, ...), so no process opens
another's shards. Opening a shard reads its tar headers only, to index where each sample's
members lie; a sample is then read by seeking to them, which is what lets grain shuffle, prefetch
and checkpoint a position (`batches.py`). Nothing here raises on bad data: `parse` returns the
sample or None and the defects it found, and the reader counts them.
"""
import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE = re.compile(r"(?:^|\D)(\d+)\.(?:jpg|jpeg|png|webp)$", re.IGNORECASE)
# what `parse` may report: a sample with any of the first group is skipped; "truncated" (more
# turns than max_turns) is kept, cut to max_turns
SKIPPED = ("no_json", "bad_json", "too_few_images", "gap_in_turns", "instruction_count",
           "empty_instruction", "corrupt_image", "too_few_turns", "corrupt_shard")
DEFECTS = SKIPPED + ("truncated",)
LANGUAGES = ("en", "zh")


def shard_list(spec: str) -> list:
  """The shard paths named by `spec`, sorted: a {"resolved_files": [...]} JSON file, or globs."""
  if spec.endswith(".json") and os.path.isfile(spec):
    try:
      with open(spec) as f:
        files = json.load(f)["resolved_files"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{spec}: not a shard list (want {{\"resolved_files\": [paths]}}): {e}")
    base = os.path.dirname(os.path.abspath(spec))
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{spec} names {len(missing)} missing shard(s), e.g. {missing[0]}")
  else:
    paths = sorted({p for g in spec.split(",") if g.strip() for p in glob.glob(g.strip())})
  if not paths:
    raise FileNotFoundError(f"no shards in {spec!r}: give a glob of .tar files or a JSON list")
  return paths


def split_name(name: str) -> tuple:
  """A tar member's (sample key, extension) as WebDataset splits them: at the first dot of the
  file name, the folders kept in the key."""
  folder, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return os.path.join(folder, stem), (ext.lower() if dot else "")


@dataclass(frozen=True)
class Entry:
  """Where one sample lies: its shard and, per extension, (byte offset, size) of the member."""
  shard: str
  key: str
  members: tuple  # ((ext, offset, size), ...)


def index_shard(path: str) -> tuple:
  """([Entry], corrupt?) from the tar headers of one shard; members of a sample must be adjacent,
  as WebDataset writes them. A shard cut short or damaged keeps the samples before the damage
  (one cut inside its data is dropped; `parse` refuses one left without all its members)."""
  entries, key, members, corrupt = [], None, [], False
  try:
    end = os.path.getsize(path)
    with tarfile.open(path, "r:") as tf:
      for m in tf:
        if not m.isfile():
          continue
        if m.offset_data + m.size > end:  # tarfile stops quietly at a cut; its last member says
          raise EOFError(f"{m.name} runs past the end of {path}")
        k, ext = split_name(m.name)
        if k != key and members:
          entries.append(Entry(path, key, tuple(members)))
          members = []
        key = k
        members.append((ext, m.offset_data, m.size))
      # tarfile also stops quietly at a damaged header, or at a cut between members: what follows
      # the last member must be the end-of-archive zeros
      with open(path, "rb") as f:
        f.seek(tf.offset)
        tail = f.read(2 ** 20)
      corrupt = len(tail) < 2 * tarfile.BLOCKSIZE or any(tail)
  except (tarfile.TarError, OSError, EOFError):
    corrupt, members = True, []
  if members:
    entries.append(Entry(path, key, tuple(members)))
  return entries, corrupt


class Source:
  """The samples of this process's shards, by index: `source[i]` is {"__key__": key, ext: bytes},
  `source.sample(i, ...)` its parsed sample and defects (the interface BucketBatches reads; the
  array_record source of tfds_builder.py has it too). `corrupt_shards` counts shards whose index
  ended early."""

  def __init__(self, shards, process_index: int = 0, process_count: int = 1):
    mine = list(shards)[process_index::process_count]
    if not mine:
      raise ValueError(f"{len(shards)} shard(s) for {process_count} processes: every process "
                       "needs at least one; write more, smaller shards")
    self.entries, self.corrupt_shards = [], 0
    for path in mine:
      entries, corrupt = index_shard(path)
      self.entries += entries
      self.corrupt_shards += corrupt

  def __len__(self):
    return len(self.entries)

  def __getitem__(self, i):
    return read(self.entries[i])

  def sample(self, i, **parse_kw):
    """`parse` of sample i: (sample or None, [defects])."""
    return parse(self[i], **parse_kw)

  def describe(self, i) -> str:
    return f"sample {self.entries[i].key} of {self.entries[i].shard}"


def read(entry: Entry, exts=None) -> dict:
  """{"__key__": key, ext: bytes} of a sample's members (those in `exts`, default all)."""
  out = {"__key__": entry.key}
  with open(entry.shard, "rb") as f:
    for ext, offset, size in entry.members:
      if exts is None or ext in exts:
        f.seek(offset)
        out[ext] = f.read(size)
  return out


def instructions(spec: str, languages=LANGUAGES) -> list:
  """Every instruction in the shards of `spec` (their JSON members only), in each of
  `languages` (falling back as `parse` does), sorted and unique; unreadable JSON is passed over
  (training skips those samples too)."""
  found = set()
  for path in shard_list(spec):
    for e in index_shard(path)[0]:
      try:
        entries = json.loads(read(e, ("json",)).get("json", b"null"))["instructions"]
      except (ValueError, KeyError, TypeError):
        continue
      for entry in entries if isinstance(entries, list) else ():
        found |= {t.strip() for l in languages if isinstance(t := _text(entry, l), str) and t.strip()}
  return sorted(found)


def _text(entry, language):
  if isinstance(entry, str):
    return entry
  if not isinstance(entry, dict):
    return None
  order = (language,) + tuple(l for l in LANGUAGES if l != language)
  return next((entry[l] for l in order if isinstance(entry.get(l), str) and entry[l].strip()), None)


def texts(raw: dict, language: str) -> list:
  """The instructions of a sample that `parse` accepted, in `language` (or the other one)."""
  return [_text(e, language).strip() for e in json.loads(raw["json"])["instructions"]]


def kept_turns(turns: int, max_turns=None, exact_turns=False) -> tuple:
  """(turns kept or None to skip the sample, [defects]) for a sample of `turns` turns. Without
  `max_turns` (stage 1, which takes every turn as a pair) `exact_turns` asks for nothing."""
  if max_turns is not None and turns > max_turns:
    return max_turns, ["truncated"]
  if exact_turns and max_turns is not None and turns != max_turns:
    return None, ["too_few_turns"]
  return turns, []


def parse(raw: dict, *, max_turns=None, exact_turns=False, language="en"):
  """(sample or None, [defects]) for one raw sample. A sample is {"key", "images": [uint8
  [H, W, 3], one per turn and the source first], "instructions": [str, one per turn]}."""
  if "json" not in raw:
    return None, ["no_json"]
  frames = {}
  for ext in raw:
    m = IMAGE.search(ext)
    if m:
      frames.setdefault(int(m.group(1)), ext)
  idx = sorted(frames)
  if len(idx) < 2:
    return None, ["too_few_images"]
  if idx != list(range(len(idx))):
    return None, ["gap_in_turns"]
  try:
    instructions = json.loads(raw["json"])["instructions"]
    if not isinstance(instructions, list):
      raise TypeError("instructions is not a list")
  except (ValueError, KeyError, TypeError):
    return None, ["bad_json"]
  texts = [_text(e, language) for e in instructions]
  if len(texts) != len(idx) - 1:
    return None, ["instruction_count"]
  if any(t is None or not t.strip() for t in texts):
    return None, ["empty_instruction"]
  turns, defects = kept_turns(len(texts), max_turns, exact_turns)
  if turns is None:
    return None, defects
  images = []
  for i in idx[:turns + 1]:
    try:
      with Image.open(io.BytesIO(raw[frames[i]])) as im:
        images.append(np.asarray(im.convert("RGB")))
    except (OSError, ValueError, Image.DecompressionBombError):
      return None, ["corrupt_image"]
  return {"key": raw["__key__"], "images": images,
          "instructions": [t.strip() for t in texts[:turns]]}, defects


def encode_image(img: np.ndarray, ext: str = "png") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="JPEG" if ext in ("jpg", "jpeg") else ext.upper())
  return buf.getvalue()


def write_shard(path: str, samples, ext: str = "png") -> int:
  """Write samples ({"key", "images", "instructions"}, or ready {ext: bytes} dicts with a
  "__key__") to one tar shard in this layout, atomically (a partial shard is never left behind);
  the number written."""
  tmp, n = f"{path}.tmp{os.getpid()}", 0
  try:
    with tarfile.open(tmp, "w") as tf:
      for s in samples:
        if "__key__" in s:
          key, members = s["__key__"], {k: v for k, v in s.items() if k != "__key__"}
        else:
          key = s["key"]
          members = {f"{t}.{ext}": encode_image(im, ext) for t, im in enumerate(s["images"])}
          members["json"] = json.dumps({"instructions": [{"en": t} for t in s["instructions"]]}).encode()
        for e, data in members.items():
          info = tarfile.TarInfo(f"{key}.{e}")
          info.size, info.mtime = len(data), 0
          tf.addfile(info, io.BytesIO(data))
        n += 1
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return n
