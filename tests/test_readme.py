"""The README's examples run as written, the way doctests do: every fenced block after a
`<!-- readme-example ... -->` marker is run in a fresh folder that sees the repository's
reference checkpoints, shell blocks line by line (with continuations) and Python blocks as one
script, in the order the README gives them."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"<!-- readme-example[^>]*-->\s*\n```(bash|python)\n(.*?)\n```", re.S)


def examples(text):
  """[(language, code)] of the marked blocks of a README text."""
  return [(m.group(1), m.group(2)) for m in MARK.finditer(text)]


def test_examples_are_found():
  text = "x\n<!-- readme-example -->\n```bash\necho a \\\n  b\n```\n```bash\nnot marked\n```\n"
  assert examples(text) == [("bash", "echo a \\\n  b")]


def test_readme_examples_run_as_written(tmp_path):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = examples(f.read())
  assert len(blocks) >= 2, "the README's marked examples are gone"
  os.symlink(os.path.join(ROOT, "checkpoints"), tmp_path / "checkpoints")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  bindir = os.path.dirname(sys.executable)  # "python" in the examples is this interpreter
  env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
  for lang, code in blocks:
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"README {lang} example failed:\n{code}\n{p.stderr[-2000:]}"
  assert sorted(os.listdir(tmp_path / "out"))[:3] == ["session.json", "session.npz", "strip.png"]
  assert (tmp_path / "out" / "turn_02.png").exists() and (tmp_path / "session.npz").exists()
  assert (tmp_path / "curves.png").exists() and (tmp_path / "samples.png").exists()
