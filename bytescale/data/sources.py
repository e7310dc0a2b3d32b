"""Where documents come from: a source spec string resolved to a list of byte documents.

Source specs understood by :func:`load_documents`:

* ``PATH`` to a file: the whole file is one document.
* ``PATH`` to a directory: every regular file under it (recursively, hidden files included), sorted by
  relative path, one document each.
* a glob pattern (contains ``*``, ``?`` or ``[``; ``**`` recurses): the matching regular files, sorted.
  An existing path is always taken literally, even if its name contains such characters.
* ``stdlib``: the built-in default corpus, the ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), recursively in sorted order. Anything under a ``site-packages`` or
  ``dist-packages`` directory is skipped (third-party code, differs per machine); the stdlib's own test
  suite is kept (it is real, varied code). About 30 MB on CPython 3.12 and read in well under a second.
* ``tfds:NAME[/CONFIG][:VERSION]:FEATURE``: the ``train`` split of a prepared TensorFlow Datasets dataset,
  read with ``tfds.data_source`` (array_record, no TensorFlow needed, nothing is downloaded), one document per
  example taken from the text feature ``FEATURE`` (``str`` values are encoded as UTF-8). ``data_dir`` says
  where the dataset was prepared (default: tfds' own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  Datasets built by :mod:`bytescale.data.tfds_builder` read as ``tfds:bytescale_text_files:text``.

``max_bytes`` caps the total bytes returned: documents are taken in order and the last one is cut so the
total is exactly ``max_bytes`` (when the source holds that much).

Every bad input raises :class:`DataError` whose message is a single line, so a command line can print it
without a traceback.
"""

from __future__ import annotations

import pathlib
import sysconfig
from collections.abc import Iterable, Iterator

from bytescale.data.files import DataError, files_under, first_line, resolve_files  # noqa: F401 (re-exported)

STDLIB_SOURCE = "stdlib"
TFDS_PREFIX = "tfds:"
TFDS_SPLIT = "train"
_SKIPPED_STDLIB_DIRECTORIES = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Examples fetched per read from a tfds data source; batching reads is much faster than one at a time.
_TFDS_READ_CHUNK = 1024


def stdlib_files() -> list[pathlib.Path]:
  """The ``.py`` files of the running interpreter's standard library, sorted, without site-packages."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = files_under(root, suffix=".py", skipped_directories=_SKIPPED_STDLIB_DIRECTORIES)
  if not files:
    raise DataError(f"no .py files found under the standard library at {str(root)!r}; use another source")
  return files


def _capped(documents: Iterable[bytes], max_bytes: int | None) -> list[bytes]:
  """Takes documents in order until ``max_bytes`` bytes are collected, cutting the last one to fit."""
  if max_bytes is None:
    return list(documents)
  kept, remaining = [], max_bytes
  for document in documents:
    if remaining <= 0:
      break
    kept.append(document[:remaining])
    remaining -= len(kept[-1])
  return kept


def _read_files(files: list[pathlib.Path]) -> Iterator[bytes]:
  for path in files:
    try:
      yield path.read_bytes()
    except OSError as error:
      raise DataError(f"cannot read {str(path)!r}: {error.strerror or first_line(error)}") from error


def _parse_tfds_spec(spec: str) -> tuple[str, str]:
  body = spec[len(TFDS_PREFIX):]
  # The feature follows the last colon; a version (name:1.0.0) may sit before it.
  dataset_name, separator, feature = body.rpartition(":")
  if not separator or not dataset_name or not feature:
    raise DataError(f"bad tfds source {spec!r}: write it as tfds:NAME[/CONFIG]:FEATURE, e.g. "
                    f"tfds:bytescale_text_files:text")
  return dataset_name, feature


def _tfds_documents(spec: str, *, data_dir: str | None, max_bytes: int | None) -> list[bytes]:
  dataset_name, feature = _parse_tfds_spec(spec)
  import tensorflow_datasets as tfds  # Imported here: only tfds sources pay for it.

  from bytescale.data import tfds_builder  # noqa: F401  Registers bytescale_text_files with tfds.

  where = f"data_dir {data_dir!r}" if data_dir else "the default tfds data_dir"
  try:
    builder = tfds.builder(dataset_name, data_dir=data_dir)
  except Exception as error:  # tfds raises many types (unknown name, bad config or version); all mean "no such".
    raise DataError(f"unknown tfds dataset {dataset_name!r}: {first_line(error)}") from error
  # Never download or generate here: a dataset must be prepared first (see bytescale.data.tfds_builder).
  if not builder.is_prepared():
    raise DataError(f"tfds dataset {dataset_name!r} is not prepared in {where}; prepare it first or pass the "
                    f"data_dir it was built in")
  try:
    source = builder.as_data_source(split=TFDS_SPLIT)
  except Exception as error:
    raise DataError(f"cannot read split {TFDS_SPLIT!r} of tfds dataset {dataset_name!r} in {where}: "
                    f"{first_line(error)}") from error
  feature_names = sorted(source.dataset_info.features.keys())
  if feature not in feature_names:
    raise DataError(f"tfds dataset {dataset_name!r} has no feature {feature!r}; its features are "
                    f"{', '.join(feature_names)}")

  def documents() -> Iterator[bytes]:
    for start in range(0, len(source), _TFDS_READ_CHUNK):
      indices = range(start, min(start + _TFDS_READ_CHUNK, len(source)))
      for example in source.__getitems__(indices):
        value = example[feature]
        if isinstance(value, str):
          yield value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray)):
          yield bytes(value)
        elif hasattr(value, "tobytes") and getattr(value, "ndim", None) == 0:  # numpy scalar bytes/str
          item = value.item()
          yield item.encode("utf-8") if isinstance(item, str) else bytes(item)
        else:
          raise DataError(f"tfds feature {feature!r} of {dataset_name!r} is not text "
                          f"(got {type(value).__name__}); pick a Text feature")

  return _capped(documents(), max_bytes)


def source_kind(spec: str) -> str:
  """'stdlib', 'tfds' or 'files': how :func:`load_documents` reads ``spec``."""
  if spec == STDLIB_SOURCE:
    return "stdlib"
  if spec.startswith(TFDS_PREFIX):
    return "tfds"
  return "files"


def load_documents(spec: str, *, max_bytes: int | None = None, data_dir: str | None = None) -> list[bytes]:
  """Resolves a source spec (see the module docstring) to its documents, in a deterministic order."""
  if not isinstance(spec, str) or not spec.strip():
    raise DataError("empty data source; give a path, a glob, 'stdlib' or 'tfds:NAME:FEATURE'")
  if max_bytes is not None and max_bytes <= 0:
    raise DataError(f"max_bytes must be positive or None, got {max_bytes}")
  kind = source_kind(spec)
  if kind == "tfds":
    documents = _tfds_documents(spec, data_dir=data_dir, max_bytes=max_bytes)
    if not documents:
      raise DataError(f"tfds source {spec!r} has no examples in split {TFDS_SPLIT!r}")
    return documents
  files = stdlib_files() if kind == "stdlib" else resolve_files(spec)
  documents = _capped(_read_files(files), max_bytes)
  if not any(documents):
    if len(files) == 1:
      raise DataError(f"file {str(files[0])!r} is empty; give a file with some text")
    raise DataError(f"all {len(files)} files of source {spec!r} are empty; give files with some text")
  return documents
