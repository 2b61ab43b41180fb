"""Pictures and tables of a multi-turn evaluation (anchoredit_jax/eval/multiturn.py): the
Markdown table, the drift plot, the contact sheet of trajectories, and all of them written out."""
import json
import os

import numpy as np


def report_turns(T: int) -> list:
  return [t for t in [1, 4, 8, 12, 16, 20, 24, 28, 32] if t <= T]


def table(results: dict, T: int) -> str:
  """Markdown: one row per system; edit success and identity PSNR at the report turns."""
  turns = report_turns(T)
  head = ("| system | " + " | ".join(f"t{t} success / identity dB" for t in turns)
          + " | state bytes at T | ms per turn (batch) |")
  lines = [head, "|" + "---|" * (len(turns) + 3)]
  for name, r in results.items():
    s, idp = r["per_turn"]["success"], r["per_turn"]["identity_psnr"]
    cells = [f"{100 * s[t - 1]:.0f}% / {idp[t - 1]:.1f}" for t in turns]
    lines.append(f"| {name} {r['label']} | " + " | ".join(cells)
                 + f" | {r['state_bytes']:,} | {1e3 * r['seconds_per_turn']:.0f} |")
  return "\n".join(lines)


def drift_plot(results: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
  for name, r in results.items():
    t = np.arange(1, len(r["per_turn"]["success"]) + 1)
    ax[0].plot(t, r["per_turn"]["identity_psnr"], "o-", ms=3, label=f"{name} {r['label']}")
    ax[1].plot(t, 100 * np.asarray(r["per_turn"]["success"]), "o-", ms=3, label=f"{name} {r['label']}")
  ax[0].set(xlabel="turn", ylabel="dB", title="identity PSNR (never-edited pixels vs source)")
  ax[1].set(xlabel="turn", ylabel="%", title="edit success", ylim=(0, 102))
  for a in ax:
    a.grid(alpha=0.3)
  ax[1].legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def contact_sheet(seqs, trajectories: dict, path: str, cell: int = 48):
  """Per kept sequence: the ground-truth row, then one row per system; turns left to right."""
  from PIL import Image, ImageDraw
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
  """results.json, table.md, drift.png and contact.png in `out`; returns the table."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({**meta, "systems": results, "skipped": skipped}, f, indent=2)
  tab = table(results, seqs["tokens"].shape[1])
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(tab + "\n")
  drift_plot(results, os.path.join(out, "drift.png"))
  contact_sheet(seqs, trajectories, os.path.join(out, "contact.png"))
  return tab
