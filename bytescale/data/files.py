"""Files named by a path / directory / glob spec, and the one-line ``DataError`` every data source raises.

Kept apart from ``sources`` so that the tfds builder (which ``sources`` loads for ``tfds:`` specs) can use them
without importing ``sources`` back.
"""

from __future__ import annotations

import glob
import os
import pathlib

_GLOB_CHARACTERS = frozenset("*?[")


class DataError(ValueError):
  """Bad data input; the message is one line meant for the user (no traceback needed)."""

  def __init__(self, message: str):
    super().__init__(_one_line(message))


def _one_line(text: str) -> str:
  """Collapses ``text`` to one line so error messages stay printable as a single line."""
  return " ".join(str(text).split())


def first_line(error: BaseException) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[0].strip() if lines else type(error).__name__


def has_glob_characters(spec: str) -> bool:
  return any(character in _GLOB_CHARACTERS for character in spec)


def files_under(directory: pathlib.Path, *, suffix: str | None = None,
                 skipped_directories: frozenset[str] = frozenset()) -> list[pathlib.Path]:
  """Regular files below ``directory``, sorted by their path relative to it (stable across machines)."""
  found = []
  for parent, child_directories, file_names in os.walk(directory):
    child_directories[:] = [name for name in child_directories if name not in skipped_directories]
    for file_name in file_names:
      if suffix is not None and not file_name.endswith(suffix):
        continue
      path = pathlib.Path(parent, file_name)
      if path.is_file():
        found.append(path)
  return sorted(found, key=lambda path: path.relative_to(directory).parts)


def resolve_files(spec: str) -> list[pathlib.Path]:
  """The files a path / directory / glob spec names, in document order. Raises DataError if there are none."""
  path = pathlib.Path(spec).expanduser()
  if path.exists():
    if path.is_dir():
      files = files_under(path)
      if not files:
        raise DataError(f"directory {spec!r} contains no files; point the source at a directory with text files")
      return files
    if not path.is_file():
      raise DataError(f"{spec!r} is not a regular file or directory")
    return [path]
  if has_glob_characters(spec):
    matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    files = [pathlib.Path(match) for match in matches if os.path.isfile(match)]
    if not files:
      raise DataError(f"glob pattern {spec!r} matches no files")
    return files
  raise DataError(f"no such file or directory: {spec!r} (sources are a path, a glob, 'stdlib' or "
                  f"'tfds:NAME:FEATURE')")
