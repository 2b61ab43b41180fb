"""The README's examples run as written, the way doctests do: every fenced block after a
`<!-- readme-example ... -->` marker is run in a fresh folder that sees the repository's
reference checkpoints, shell blocks line by line (with continuations) and Python blocks as one
script, in the order the README gives them.

Every other command the README shows (training for hours, pods, benchmarks, make targets) is
checked as written without being run: `python -m` commands with ANCHOREDIT_ARGS_ONLY=1 (each
parses its flags and its --config with overrides, then exits), make targets with `make -n`,
shell scripts with `bash -n`. Only the paths of data a test cannot have are replaced (a tiny
random Wan2.1 folder stands in for Wan2.1-T2V-1.3B-Diffusers)."""
import ast
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

from anchoredit_jax import cli
from tests.helpers import tiny_wan_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"<!-- readme-example[^>]*-->\s*\n```(bash|python)\n(.*?)\n```", re.S)
BLOCK = re.compile(r"```bash\n(.*?)\n```", re.S)
INLINE = re.compile(r"`((?:python -m|make|bash|launch/\S+\.sh|sbatch) [^`]+|\.ci/run)`")
# README commands this test cannot check, and why; any other kind of command fails it
NOT_CHECKED = {"pip install": "installs a package (the TPU wheel)",
               "launch/gke/": "shown with placeholders (...) for a cluster's own arguments"}


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
  assert (tmp_path / "tree" / "tree.json").exists() and (tmp_path / "tree" / "images" / "3.png").exists()


def commands(text):
  """Every command of the README outside the marked examples: the lines of its other bash blocks
  (continuations joined, comments cut) and its inline `python -m` / `make` / `bash` spans."""
  marked = {m.group(2) for m in MARK.finditer(text)}
  out = []
  for m in BLOCK.finditer(text):
    if m.group(1) in marked:
      continue
    for line in m.group(1).replace("\\\n", " ").splitlines():
      line = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()
      if line:
        out.append(" ".join(line.split()))
  out += [" ".join(c.split()) for c in INLINE.findall(text)]
  return list(dict.fromkeys(out))


def test_commands_are_found():
  text = ("`make test` and `python -m a --b` inline\n<!-- readme-example -->\n```bash\nrun me\n```\n"
          "```bash\npython -m x \\\n  --y=1   # a comment\n# only a comment\nmake z\n```\n")
  assert commands(text) == ["python -m x --y=1", "make z", "make test", "python -m a --b"]


def test_readme_commands_parse_as_written(tmp_path_factory):
  with open(os.path.join(ROOT, "README.md")) as f:
    cmds = commands(f.read())
  assert len(cmds) >= 20, "the README's commands are gone"
  wan = tiny_wan_folder(tmp_path_factory.mktemp("Wan2.1-tiny-Diffusers"))
  tmp = tmp_path_factory.mktemp("readme")
  swap = {"/data/Wan2.1-T2V-1.3B-Diffusers": str(wan), "/data/shapesedit_umt5": str(tmp / "store")}
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", XLA_FLAGS="", **{cli.ARGS_ONLY: "1"})
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  todo = []
  for cmd in cmds:
    if any(cmd.startswith(k) for k in NOT_CHECKED):
      continue
    run = cmd
    for a, b in swap.items():
      run = run.replace(a, b)
    if cmd.startswith("python -m "):
      want = "arguments ok"
    elif cmd.startswith("make "):
      run, want = cmd.replace("make ", "make -n ", 1), ""
    elif cmd.startswith("bash "):
      run, want = cmd.replace("bash ", "bash -n ", 1), ""
    elif cmd.startswith("launch/"):  # a launcher: what it would run, printed by its --dry-run
      script, _, rest = run.partition(" ")
      run, want = f"bash {script} --dry-run {rest}", "anchoredit_jax.train"
    elif cmd.startswith(("sbatch ", ".ci/run")):
      run, want = "bash -n " + cmd.removeprefix("sbatch "), ""
    else:
      pytest.fail(f"a README command this test does not know how to check: {cmd}")
    todo.append((cmd, run, want))

  def check(job):
    cmd, run, want = job
    p = subprocess.run(["bash", "-c", run], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode or want not in p.stdout:
      return f"{cmd}\n  exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"
    return None

  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time: each mostly imports
    failed = [f for f in pool.map(check, todo) if f]
  assert not failed, "README commands that do not parse as written:\n" + "\n".join(failed)
  assert len(todo) >= 20


def test_args_only_is_honoured_after_the_config_is_read():
  """A bad override still fails in ARGS_ONLY mode: the check reads the config before it stops."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **{cli.ARGS_ONLY: "1"})
  p = subprocess.run([sys.executable, "-m", "anchoredit_jax.train", "--config=configs/causal.py",
                      "--config.causal.windw=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 2 and "windw" in p.stderr and "arguments ok" not in p.stdout


def test_layout_names_every_module():
  """The README's Layout names every module and script of the tree (by file name)."""
  with open(os.path.join(ROOT, "README.md")) as f:
    layout = f.read().split("## Layout", 1)[1].split("\n## ", 1)[0]
  files = subprocess.run(["git", "ls-files", "anchoredit_jax", "benchmark", "configs", "launch"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  names = {os.path.basename(f).removesuffix(".py") for f in files
           if f.endswith((".py", ".sh", ".sbatch")) and not f.endswith("__init__.py")}
  assert names, "git ls-files found nothing"
  missing = sorted(n for n in names if n not in layout)
  assert not missing, f"modules the README's Layout does not name: {missing}"
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  top = {f.split("/")[0] for f in tracked} - {".gitignore", "README.md"}
  extra = {"helpers.py", "golden/", "Dockerfile.dockerignore", "constraints.txt", "setup.py"}
  missing = sorted(n for n in top | extra if n not in layout)
  assert not missing, f"top-level entries the README's Layout does not name: {missing}"


def test_every_command_describes_itself_in_whole_sentences():
  """Each command's --help opens with its module docstring's first paragraph (cli.description,
  or absl_flags_parser for the absl ones), which ends a sentence: no description cut at a line."""
  bad = []
  for pkg in ("anchoredit_jax", "benchmark"):
    for p in sorted(pathlib.Path(ROOT, pkg).rglob("*.py")):
      src = p.read_text()
      if '__name__ == "__main__"' not in src or not ("ArgumentParser(" in src or "app.run(" in src):
        continue
      first = cli.description(ast.get_docstring(ast.parse(src)) or "")
      if not first.endswith((".", ".)")) or not ("cli.description" in src or "absl_flags_parser" in src):
        bad.append(f"{p.relative_to(ROOT)}: {first[-60:]!r}")
  assert not bad, "commands whose --help description is cut or made by hand:\n" + "\n".join(bad)
