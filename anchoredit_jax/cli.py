"""What the project's commands share."""


def description(doc: str) -> str:
  """A module docstring's first paragraph as one line, for --help (its first line alone may stop
  mid-sentence)."""
  return " ".join(doc.strip().split("\n\n")[0].split())
