"""One-line errors: what a command prints instead of a traceback."""
import logging
import os
import sys


def short(e, limit: int = 200) -> str:
  """An exception's message on one line, whitespace collapsed, cut to `limit` characters with
  '...' (library messages can hold whole specs or tracebacks)."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3].rsplit(" ", 1)[0] + " ..."


def message(e, limit: int = 400) -> str:
  """The one line to print for an exception we raised ourselves (its first argument)."""
  return short(e.args[0] if e.args else e, limit)


def fail(message: str, code: int = 2, before_exit=None):
  """Print `error: message` and exit now with `code`. os._exit, not sys.exit: after a failed
  orbax save or restore its background threads would print tracebacks at interpreter shutdown,
  burying the one line. Streams are flushed first; files a command writes are closed by then.
  `before_exit`, if given, is called after the line is printed (e.g. to wait for peers)."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  if before_exit is not None:
    before_exit()
  os._exit(code)


class OneLineLibraryErrors(logging.Filter):
  """Log records of errors from background threads of a library (orbax's async saves) are kept as
  one short line without their traceback: the error reaches the main thread too, which says what
  to do. Without this a full disk prints a thousand lines of tensorstore specs."""

  def __init__(self, package: str):
    super().__init__()
    self.package = f"/{package}/"

  def filter(self, record):
    if record.levelno >= logging.ERROR and self.package in record.pathname.replace(os.sep, "/"):
      record.msg, record.args = short(record.getMessage()), None
      record.exc_info = record.exc_text = record.stack_info = None
    return True
