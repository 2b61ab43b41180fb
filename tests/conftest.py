"""Tests run on 8 fake CPU devices so sharding is exercised; single-device tests pick one."""
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this pytest run, empty at its start and shared with the
# commands the tests start: many tests train or edit the same smoke models, and compiling them
# again is most of their time. Programs are the same either way, so are the results.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="anchoredit_jax_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_unconfigure(config):
  if "_CACHE" in globals():
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line("markers", "faults: the full fault-injection suite (about 40 CPU minutes); "
                          "run with pytest -m faults tests/test_fault_suite.py")


# The files that take several minutes, longest first: `make test` hands whole files to its two
# workers in collection order, and a long file collected last keeps one worker busy while the
# other has nothing left to do (the clean-clone run of 2026-12-03 at 258c6db).
LONGEST_FIRST = ("test_multiprocess.py", "test_cli.py", "test_wan_pipeline.py", "test_dmd.py",
                 "test_fault_suite.py", "test_pretrain.py", "test_aot.py", "test_causal.py",
                 "test_distill.py", "test_faults.py")


def _rank(item):
  name = os.path.basename(str(item.fspath))
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
  """The longest files first (a stable sort: each file's own order kept); tests marked `faults`
  run only when asked for with -m (make test deselects them)."""
  items.sort(key=_rank)
  if config.option.markexpr:
    return
  keep = [i for i in items if "faults" not in i.keywords]
  if len(keep) != len(items):
    config.hook.pytest_deselected(items=[i for i in items if "faults" in i.keywords])
    items[:] = keep
