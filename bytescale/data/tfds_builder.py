"""A TensorFlow Datasets builder that turns local text files into an array_record dataset, without TensorFlow.

Build once, then train from it like any tfds dataset::

  from bytescale.data.tfds_builder import build_text_dataset
  build_text_dataset("corpus/**/*.txt", data_dir="/data/tfds")
  # then: source "tfds:bytescale_text_files:text" with tfds_data_dir="/data/tfds"

The dataset is named ``bytescale_text_files`` (version 1.0.0) and has one split, ``train``, with one example
per file and one feature, ``text`` (a ``tfds.features.Text``). Files are resolved like a file source
(a file, a directory walked recursively, or a glob; see :mod:`bytescale.data.sources`) and stored in that
sorted order: shuffling at generation time is disabled so example i is file i. File bytes are stored as is,
so files need not be valid UTF-8.

One ``data_dir`` holds one such dataset. Building again into a ``data_dir`` that already has it is a no-op
unless ``overwrite=True``.

Reading needs no TensorFlow: ``tfds.data_source("bytescale_text_files", split="train", data_dir=...)``
returns a random-access source of ``{"text": bytes}`` examples.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from bytescale.data.files import DataError, resolve_files

DATASET_NAME = "bytescale_text_files"
TEXT_FEATURE = "text"


class BytescaleTextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files, one example per file, stored as array_record (readable by ``tfds.data_source``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per local file, feature 'text'."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup touches the `importlib_resources` backport, which tfds only requires on Python < 3.9,
    # so it fails on 3.12 without it. This file is the answer it would compute anyway.
    return epath.Path(__file__)

  def __init__(self, *, files: Sequence[str | os.PathLike] = (), **kwargs):
    # Files only matter when generating; reading a prepared dataset back needs none.
    self._source_files = [pathlib.Path(path) for path in files]
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # tfds prints "Downloading and preparing..." and "...downloaded and prepared" banners; nothing is downloaded
  # here, and bytescale keeps data loading quiet.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files collected by bytescale, one example per file.",
        features=tfds.features.FeaturesDict({TEXT_FEATURE: tfds.features.Text()}),
        # Keep the files' sorted order, so example i is file i (tfds would otherwise shuffle by key hash).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    if not self._source_files:
      raise DataError(f"no files given to build {DATASET_NAME}; pass files to build_text_dataset")
    return {"train": self._generate_examples(self._source_files)}

  def _generate_examples(self, files: Sequence[pathlib.Path]):
    for index, path in enumerate(files):
      # Zero-padded index keys keep generation order and stay unique even if two paths look alike.
      yield f"{index:09d}", {TEXT_FEATURE: path.read_bytes()}


def build_text_dataset(files_or_glob: str | os.PathLike | Sequence[str | os.PathLike], data_dir: str | os.PathLike,
                       *, overwrite: bool = False, show_progress: bool = False) -> BytescaleTextFiles:
  """Builds ``bytescale_text_files`` from local files into ``data_dir`` and returns the prepared builder.

  ``files_or_glob`` is a file, a directory, a glob pattern, or an explicit list of files (kept in the given
  order). Raises DataError when it names no files. tfds' progress bars are hidden unless ``show_progress``.
  """
  if isinstance(files_or_glob, (str, os.PathLike)):
    files = resolve_files(os.fspath(files_or_glob))
  else:
    files = [pathlib.Path(path) for path in files_or_glob]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
      raise DataError(f"not a file: {missing[0]!r} ({len(missing)} of {len(files)} given paths are missing)")
    if not files:
      raise DataError(f"no files given to build {DATASET_NAME}")
  builder = BytescaleTextFiles(files=files, data_dir=os.fspath(data_dir))
  download_mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
                   else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # tfds keeps the progress-bar switch in module state; put back whatever the caller had.
  progress_was_shown = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(show_progress)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=download_mode))
  finally:
    tfds.display_progress_bar(progress_was_shown)
  return builder
