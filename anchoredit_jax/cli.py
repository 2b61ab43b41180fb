"""What the project's commands share."""
import os
import sys

from absl import flags

from configs.common import config_error

# Set to 1, every command parses its flags (and --config with its overrides), prints
# `arguments ok` and exits 0 before reading or writing anything: tests/test_readme.py checks the
# README's long-running commands (training, pods, benchmarks) this way, exactly as written.
ARGS_ONLY = "ANCHOREDIT_ARGS_ONLY"


def stop_if_args_only():
  if os.environ.get(ARGS_ONLY) == "1":
    print("arguments ok")
    sys.exit(0)


def parse_args(ap, argv=None):
  """`ap.parse_args(argv)`, honouring ARGS_ONLY."""
  args = ap.parse_args(argv)
  stop_if_args_only()
  return args


def description(doc: str) -> str:
  """A module docstring's first paragraph as one line, for --help (its first line alone may stop
  mid-sentence)."""
  return " ".join(doc.strip().split("\n\n")[0].split())


def absl_flags_parser(doc: str):
  """A flags_parser for absl's app.run: --help prints the command's description and its own flags
  and exits 0; a bad flag or --config is one `error:` line and exit 2 instead of a traceback."""
  def parse(argv):
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
      print(f"usage: python -m {sys.modules['__main__'].__spec__.name} [flags]\n\n{description(doc)}\n")
      print(flags.FLAGS.main_module_help())
      sys.exit(0)
    try:
      rest = flags.FLAGS(argv)
      for name in flags.FLAGS:  # a config file that failed to load raises when first used
        hasattr(flags.FLAGS[name].value, "to_json")
    except (flags.Error, AttributeError, KeyError, OSError) as e:
      print(f"error: {config_error(e)}", file=sys.stderr, flush=True)
      sys.exit(2)
    stop_if_args_only()
    return rest
  return parse
