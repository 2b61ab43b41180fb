"""The package's imports flow one way: no module imports, directly or through others, a module
that imports it back, and no function body hides an import of the package (which is how a cycle
gets papered over). Read from the source with `ast`, so nothing here depends on import order."""
import ast
import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("anchoredit_jax", "configs", "benchmark")
# imports that may stay inside a function: each loads an optional heavy dependency only where a
# code path needs it (a TPU kernel library)
DEFERRED_OK = {("anchoredit_jax.models.attention", "anchoredit_jax.models.splash")}


def modules() -> dict:
  """{dotted module name: path} of every module of the package and the configs."""
  out = {}
  for pkg in PACKAGES:
    for p in sorted((ROOT / pkg).rglob("*.py")):
      parts = p.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
  return out


def imports(name, path, known):
  """[(imported module, at module level?)] of the package's own modules that `name` imports."""
  tree = ast.parse(path.read_text())
  here = name if path.name == "__init__.py" else name.rpartition(".")[0]
  top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try))
                                      for n in ast.walk(s)}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = here.split(".")[:len(here.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in known:  # `import a.b.c` depends on the deepest module that exists
        t = t.rpartition(".")[0]
      if t and t != name:
        found.append((t, id(node) in top))
  return found


def graph():
  known = modules()
  return known, {n: imports(n, p, known) for n, p in known.items()}


def cycle(edges):
  """One import cycle [a, b, ..., a] of the graph, or None."""
  state, stack = {}, []

  def visit(v):
    state[v] = "open"
    stack.append(v)
    for w in sorted(edges[v]):
      if state.get(w) == "open":
        return stack[stack.index(w):] + [w]
      if w not in state and (found := visit(w)):
        return found
    state[v] = "done"
    stack.pop()
    return None

  for v in sorted(edges):
    if v not in state and (found := visit(v)):
      return found
  return None


def test_the_checker_finds_a_cycle_and_a_hidden_import(tmp_path):
  assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert cycle({"a": {"b"}, "b": set()}) is None
  p = tmp_path / "m.py"
  p.write_text("import x.y\nfrom . import z\ndef f():\n  from x import w\n")
  known = {"x", "x.y", "x.w", "pkg.z", "pkg.m"}
  assert sorted(imports("pkg.m", p, known)) == [("pkg.z", True), ("x.w", False), ("x.y", True)]


def test_package_imports_have_no_cycle():
  _, edges = graph()
  found = cycle({n: {t for t, _ in deps} for n, deps in edges.items()})
  assert found is None, "import cycle: " + " -> ".join(found)


def test_no_package_import_is_hidden_in_a_function():
  _, edges = graph()
  hidden = sorted({(n, t) for n, deps in edges.items() for t, top in deps
                  if not top and (n, t) not in DEFERRED_OK})
  assert not hidden, f"imports inside functions (move them to the top of the module): {hidden}"



# third-party imports that may stay inside a function, each an optional or heavy dependency only
# one code path needs: {(module, imported top-level name): why}
OPTIONAL_DEFERRED = {
    ("anchoredit_jax.data.pipeline", "jax"): "grain's worker processes import the pipeline, not jax",
    ("anchoredit_jax.data.shapes", "skimage"): "photo backgrounds only",
    ("anchoredit_jax.data.tokenize", "transformers"): "umT5's tokenizer only (Wan presets)",
    ("anchoredit_jax.train", "tensorboardX"): "imported with torch blocked, where the writer is made",
    ("benchmark.vs_pytorch", "torch"): "the PyTorch comparison, a test-only extra",
    ("benchmark.vs_pytorch", "diffusers"): "the PyTorch comparison, a test-only extra",
}


def function_level_imports(path) -> set:
  """{top-level names} a module imports inside its functions (not at module level)."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try))
                                      for n in ast.walk(s)}
  out = set()
  for node in ast.walk(tree):
    if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
      continue
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
    out |= {n.split(".")[0] for n in names}
  return out


def test_only_optional_dependencies_are_imported_inside_functions():
  deferred = {(n, t) for n, p in modules().items() for t in function_level_imports(p)
              if t not in PACKAGES}
  unexpected = sorted(deferred - set(OPTIONAL_DEFERRED))
  assert not unexpected, f"imports inside functions that belong at the top of the module: {unexpected}"
  assert not set(OPTIONAL_DEFERRED) - deferred, "OPTIONAL_DEFERRED lists an import no longer deferred"


def test_the_tensorboard_writer_leaves_torch_out_of_a_training_process(tmp_path):
  """tensorboardX imports torch where installed (make test installs it); a training process
  writes its scalars without it."""
  code = ("import sys; from anchoredit_jax import train; w = train.summary_writer(sys.argv[1]); "
          "w.add_scalar('train/loss_of_the_test', 0.5, 3); w.close(); print('torch' in sys.modules)")
  p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr[-2000:]
  events = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"train/loss_of_the_test" in events[0].read_bytes()
