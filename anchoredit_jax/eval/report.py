"""Pictures and tables of a multi-turn evaluation (anchoredit_jax/eval/multiturn.py): the
Markdown tables with 95% intervals, the headline sentence, the drift plot, the contact sheet of
trajectories, and all of them written out."""
import json
import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchoredit_jax.eval import own_data  # noqa: E402


def report_turns(T: int) -> list:
  """The turns a table shows: 1, 4, 8, ... up to T, and T itself."""
  return sorted({t for t in [1, 4, 8, 12, 16, 20, 24, 28, 32] if t <= T} | {T})


def pct(entry: dict, t: int, unit: str = "") -> str:
  """A rate at turn t (from 1) with its interval, in percent: '81 [74,86]' ('-' if undefined)."""
  v, (lo, hi) = entry["value"][t - 1], entry["ci"][t - 1]
  return "-" if not np.isfinite(v) else f"{100 * v:.0f}{unit} [{100 * lo:.0f},{100 * hi:.0f}]"


def db(entry: dict, t: int, unit: str = "", sign: str = "") -> str:
  """A mean PSNR (or gap) at turn t with its interval, in dB: '26.7 [26.1,27.3]'."""
  v, (lo, hi) = entry["value"][t - 1], entry["ci"][t - 1]
  return "-" if not np.isfinite(v) else f"{v:{sign}.1f}{unit} [{lo:{sign}.1f},{hi:{sign}.1f}]"


CONTEXT_WORDS = {"own": "its own outputs as context", "oracle": "the ground-truth turns as context"}


def _section(title, results, turns, cell) -> list:
  """A '### title' and a table: one row per system, one column per report turn."""
  lines = [f"### {title}", "", "| system | " + " | ".join(f"t{t}" for t in turns) + " |",
           "|" + "---|" * (len(turns) + 1)]
  lines += [f"| {name} {r['label']} | " + " | ".join(cell(r, t) for t in turns) + " |"
            for name, r in results.items()]
  return lines + [""]


def wall(r: dict) -> str:
  """Wall seconds of a system's run (compilation included), and of its oracle run."""
  return f"{r['wall_seconds']:.0f}" + (f" + {r['oracle']['wall_seconds']:.0f} oracle" if "oracle" in r else "")


def cost(results: dict) -> list:
  """The Markdown lines of what each system's run cost: state bytes, time per turn, wall time."""
  lines = ["### Cost", "", "| system | sequences | state bytes at T | ms per turn (batch) | wall s |",
           "|---|---|---|---|---|"]
  return lines + [f"| {name} {r['label']} | {r['stats']['sequences']} | {r['state_bytes']:,} | "
                  f"{1e3 * r['seconds_per_turn']:.0f} | {wall(r)} |" for name, r in results.items()]


RATES = ("success", "conditional_success", "all_correct")


def _cell(key, oracle=False):
  """Cell function (result, turn) -> text of one statistic of the own (or oracle) run."""
  fmt = pct if key in RATES else db
  return lambda r, t: fmt((r["oracle"] if oracle else r)["stats"][key], t)


def table(results: dict, T: int) -> str:
  """Markdown tables (rows: systems; columns: the report turns), 95% intervals in brackets:
  success (Wilson), success given all earlier turns succeeded (Wilson, with its n), all edits so
  far correct (Wilson), identity and preserved PSNR (bootstrap over sequences); with an oracle
  run, its success and identity beside the own context's and the gap; then what each run cost."""
  turns = report_turns(T)
  ctx = next(iter(results.values()))["context"]
  cond = lambda r, t: f"{pct(r['stats']['conditional_success'], t)} n={r['stats']['conditional_success']['n'][t - 1]}"
  lines = [f"Context: {CONTEXT_WORDS[ctx]}. Brackets: 95% intervals (rates: Wilson score; PSNR: "
           "bootstrap over sequences, 2000 resamples).", "",
           *_section("Edit success, %", results, turns, _cell("success")),
           *_section("Success given every earlier turn succeeded, % (n such sequences)", results, turns, cond),
           *_section("All edits so far correct, % of sequences", results, turns, _cell("all_correct")),
           *_section("Identity PSNR, dB (never-edited pixels against the source)", results, turns, _cell("identity_psnr")),
           *_section("Preserved PSNR, dB (outside the edit mask, against the ground truth)", results,
                     turns, _cell("preserved_psnr"))]
  oracle = {n: r for n, r in results.items() if "oracle" in r}
  if oracle:
    side = lambda r, t: (f"{db(r['stats']['identity_psnr'], t)} / {db(r['oracle']['stats']['identity_psnr'], t)}"
                         f" / {db(r['oracle']['identity_gap'], t, sign='+')}")
    lines += [*_section("Oracle context (the ground-truth turns as context): edit success, %", oracle,
                        turns, _cell("success", oracle=True)),
              *_section("Identity PSNR, dB: own context / oracle context / gap (own - oracle, "
                        "paired over sequences)", oracle, turns, side)]
  return "\n".join(lines + cost(results))


def _change(entry, a, b, unit, fmt) -> str:
  """'falls from X [..] at turn a to Y [..] at turn b' with the verb the intervals allow."""
  (lo_a, hi_a), (lo_b, hi_b) = entry["ci"][a - 1], entry["ci"][b - 1]
  verb = ("falls" if hi_b < lo_a else "rises" if lo_b > hi_a else "goes")
  tail = "" if verb != "goes" else " (the intervals overlap)"
  return f"{verb} from {fmt(entry, a, unit)} at turn {a} to {fmt(entry, b, unit)} at turn {b}{tail}"


def drift_sentence(name: str, r: dict) -> str:
  """The headline of a system's run, computed from its numbers: success and identity from the
  first to the last turn with intervals, the share with every edit right, and the oracle's
  identity at the last turn where there is one."""
  s, T = r["stats"], len(r["stats"]["success"]["value"])
  out = (f"System {name} ({r['label']}, {CONTEXT_WORDS[r['context']]}, {s['sequences']} held-out "
         f"sequences): edit success {_change(s['success'], 1, T, '%', pct)}; identity PSNR "
         f"{_change(s['identity_psnr'], 1, T, ' dB', db)}; all {T} edits correct in "
         f"{pct(s['all_correct'], T, '%')} of sequences.")
  if "oracle" in r:
    o = r["oracle"]
    out += (f" With the ground-truth turns as context, identity PSNR at turn {T} is "
            f"{db(o['stats']['identity_psnr'], T, ' dB')} and success {pct(o['stats']['success'], T, '%')}; "
            f"own minus oracle identity: {db(o['identity_gap'], T, ' dB', '+')}.")
  return out + " Brackets: 95% intervals."


def headline(results: dict) -> str:
  """drift_sentence of the main system (i) if it ran, else of the first system."""
  name = "i" if "i" in results else next(iter(results))
  if not masked(results):
    return own_sentence(name, results[name])
  return drift_sentence(name, results[name])


def masked(results: dict) -> bool:
  """Whether the results are ShapesEdit's (exact masks: success, identity PSNR) or own data's."""
  return "success" in next(iter(results.values()))["stats"]


def num(entry: dict, t: int, unit: str = "") -> str:
  """A mean at turn t with its interval, three decimals: '0.042 [0.038,0.047]'."""
  v, (lo, hi) = entry["value"][t - 1], entry["ci"][t - 1]
  return f"{v:.3f}{unit} [{lo:.3f},{hi:.3f}]"


def own_metrics(r: dict) -> list:
  return [k for k in own_data.MEANING if k in r["stats"]]


def own_sentence(name: str, r: dict) -> str:
  """The headline of a run on your own data: its identity (or, without CLIP/DINO, its L1) and
  its instruction following (CLIP-T), first turn to last, with intervals."""
  s, T = r["stats"], len(r["stats"]["l1"]["value"])
  keys = [k for k in ("dino_source", "clip_i_source", "clip_t") if k in s] or ["l1"]
  parts = [f"{own_data.MEANING[k]} {_change(s[k], 1, T, '', num)}" for k in keys]
  return (f"System {name} ({r['label']}, {CONTEXT_WORDS[r['context']]}, {s['sequences']} sequences "
          f"of your data): " + "; ".join(parts) + ". Brackets: 95% bootstrap intervals.")


def own_table(results: dict, T: int) -> str:
  """One table per metric (rows: systems; columns: the report turns), 95% bootstrap intervals;
  an oracle run's rows beside; then the cost."""
  turns = report_turns(T)
  cell = lambda key, oracle=False: lambda r, t: num((r["oracle"] if oracle else r)["stats"][key], t)
  ctx = next(iter(results.values()))["context"]
  lines = [f"Context: {CONTEXT_WORDS[ctx]}. Brackets: 95% intervals (bootstrap over sequences, "
           "2000 resamples).", ""]
  for key in own_metrics(next(iter(results.values()))):
    lines += _section(own_data.MEANING[key], results, turns, cell(key))
    oracle = {n: r for n, r in results.items() if "oracle" in r}
    if oracle:
      lines += _section(f"{own_data.MEANING[key]}, ground-truth turns as context", oracle, turns,
                        cell(key, oracle=True))
  return "\n".join(lines + cost(results))


def drift_plot(results: dict, path: str):
  """Identity PSNR and edit success against turn, a line per system with its 95% band; an oracle
  run dashed in the same colour."""
  panels = ((("identity_psnr", 1, "dB", "identity PSNR (never-edited pixels vs source), 95% band"),
             ("success", 100, "%", "edit success, 95% band")) if masked(results) else
            [(k, 1, "", own_data.MEANING[k]) for k in own_data.PLOTTED
             if k in next(iter(results.values()))["stats"]][:4])
  fig, ax = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
  ax = ax[0]
  for i, (name, r) in enumerate(results.items()):
    runs = [(r, "o-", f"{name} {r['label']}")] + ([(r["oracle"], "--", f"{name} oracle context")]
                                                  if "oracle" in r else [])
    for run, style, label in runs:
      for a, (key, scale, _, _) in zip(ax, panels):
        e = run["stats"][key]
        t = np.arange(1, len(e["value"]) + 1)
        a.plot(t, scale * np.asarray(e["value"]), style, ms=3, color=f"C{i}", label=label)
        a.fill_between(t, *(scale * np.asarray(e["ci"]).T), color=f"C{i}", alpha=0.15, lw=0)
  for a, (key, _, unit, title) in zip(ax, panels):
    a.set(xlabel="turn", ylabel=unit, title=title, **({"ylim": (0, 102)} if key == "success" else {}))
    a.grid(alpha=0.3)
  ax[-1].legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def contact_sheet(seqs, trajectories: dict, path: str, cell: int = 48):
  """Per kept sequence: the ground-truth row, then one row per system; turns left to right."""
  names = list(trajectories)
  keep = min(t.shape[0] for t in trajectories.values())
  T = seqs["tokens"].shape[1]
  label_w = 150
  rows = keep * (len(names) + 1)
  sheet = Image.new("RGB", (label_w + cell * (T + 1), cell * rows + 4 * keep), "white")
  draw = ImageDraw.Draw(sheet)
  y = 0
  for s in range(keep):
    for row, name in enumerate(["ground truth"] + names):
      imgs = seqs["images"][s] if row == 0 else np.concatenate(
          [seqs["images"][s, :1], trajectories[name][s]], 0)
      draw.text((4, y + cell // 2 - 6), f"seq {s}: {name}"[:24], fill="black")
      for t, im in enumerate(imgs):
        sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_w + t * cell, y))
      y += cell
    y += 4
  sheet.save(path)


def write_outputs(results, seqs, trajectories, skipped, out, meta) -> str:
  """results.json (with `meta` and the images' height and width), table.md, drift.png and
  contact.png in `out`; returns the table."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({**meta, "image_size": list(seqs["images"].shape[2:4]), "systems": results,
               "skipped": skipped}, f, indent=2)
  tab = (table if masked(results) else own_table)(results, seqs["tokens"].shape[1])
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(headline(results) + "\n\n" + tab + "\n")
  drift_plot(results, os.path.join(out, "drift.png"))
  contact_sheet(seqs, trajectories, os.path.join(out, "contact.png"))
  return tab
