"""From documents to model batches: framing, the train/validation split, row packing and the grain pipeline.

Token stream. Each document becomes ``[BOS] + bytes + [EOS]`` (ids from :mod:`bytescale.vocab`) and the framed
documents are concatenated, in source order, into one ``uint16`` stream (:func:`frame_documents`).

Split. The last ``floor(len(stream) * val_fraction)`` tokens of the stream are the validation split, the rest
is the train split (:func:`split_stream`). It depends only on the source, so it is the same on every run and
machine; the cut may fall inside a document. With ``val_fraction=0`` the validation split is empty.

Rows. A split of ``N`` tokens is cut into ``ceil((N - 1) / T)`` rows with stride ``T`` and one token of
overlap: row ``r`` is ``tokens[r*T : r*T + T + 1]``, ``inputs = row[:-1]``, ``targets = row[1:]``. So every
token but the first of a split is a target exactly once. The last row is filled up with PAD. Per row
(:func:`pack_rows`):

* ``segment_ids`` (int32): the documents seen by the inputs, numbered 1, 2, 3... in order of appearance in the
  row (a BOS input opens the next one; the row starts in document 1 even mid-document); 0 on padding inputs.
  The model lets a token attend only within its own segment.
* ``loss_mask`` (float32): 1.0 where the target is real and in the input's document: 0.0 on padding and
  where the target is the BOS that opens the next document. EOS targets are trained. Byte value 0 (NUL) is
  an ordinary byte: the mask is decided by position and by the BOS id, never by byte values.

Batches are dicts of ``inputs``, ``targets``, ``segment_ids``, ``loss_mask``, each ``[batch, T]``.

Training (:func:`train_iterator`) is a grain pipeline::

  MapDataset.range(num_rows).shuffle(seed).repeat()   # row ids; reshuffled every epoch, never runs out
    .batch(global_batch, drop_remainder=True)          # global batches of row ids (may span an epoch boundary)
    .map(pack this process's slice of the ids)         # rows are only built for the local slice
    .to_iter_dataset(...) -> iterator

Row ids are batched before rows are built so that each process only packs its own rows. Process sharding:
process ``p`` of ``P`` receives rows ``[p*B/P, (p+1)*B/P)`` of every global batch of ``B`` rows, so
concatenating the per-process batches in process order gives exactly the single-process global batch (this is
the layout ``jax.make_array_from_process_local_data`` expects for a batch axis sharded over processes).

Checkpointing. The iterator is a ``grain.DatasetIterator``: ``state = it.get_state()`` (a small JSON-able
dict) and ``it.set_state(state)`` on a freshly built iterator resume the identical batch sequence. With orbax,
save it next to the model state::

  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                             data=grain.checkpoint.CheckpointSave(iterator)))
  manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                data=grain.checkpoint.CheckpointRestore(iterator)))

(grain 0.2.18 names: ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``; they exist only when orbax is
installed and write one ``process_<i>-of-<n>.json`` per process.) A state is valid only for the same corpus,
``seq_len``, ``batch_size``, ``seed`` and process layout.

Evaluation (:func:`eval_batches`) walks a split's rows in order, unshuffled, and pads the last batch with
all-padding rows (``loss_mask`` 0), so every target is scored exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from bytescale.data.sources import DataError, load_documents
from bytescale.vocab import BOS, EOS, PAD

STREAM_DTYPE = np.uint16  # Holds every id of the 260-token vocabulary at half the memory of int32.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")
# Rows are cut from an in-memory array, so reading is cheap: grain recommends no reader threads for in-memory
# data (they only contend for the GIL), and JAX's async dispatch already overlaps packing with device work.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to cut it into batches. Invalid values raise DataError naming the field and fix."""

  source: str = "stdlib"
  seq_len: int = 256
  batch_size: int = 8  # Global batch size (summed over processes).
  val_fraction: float = 0.1  # Share of each corpus' stream, taken from its end, held out for validation.
  seed: int = 0  # Training shuffle seed.
  max_bytes: int | None = None  # Cap on corpus bytes read (None = all).
  tfds_data_dir: str | None = None  # data_dir for tfds: sources (None = tfds' default).

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source.strip():
      raise DataError("DataConfig.source is empty; give a path, a glob, 'stdlib' or 'tfds:NAME:FEATURE'")
    _require_int("seq_len", self.seq_len, minimum=1, fix="use a sequence length of at least 1, e.g. 256")
    _require_int("batch_size", self.batch_size, minimum=1, fix="use a batch size of at least 1, e.g. 8")
    _require_int("seed", self.seed, minimum=0, fix="use a seed in [0, 2**32)")
    if self.seed >= 2**32:
      raise DataError(f"DataConfig.seed={self.seed} is too large; use a seed in [0, 2**32)")
    if (isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float))
        or not 0.0 <= self.val_fraction < 1.0):
      raise DataError(f"DataConfig.val_fraction={self.val_fraction!r} is out of range; use a fraction in "
                      f"[0, 1), e.g. 0.1")
    if self.max_bytes is not None:
      _require_int("max_bytes", self.max_bytes, minimum=1, fix="use a positive byte count, or None for all")


def _require_int(field: str, value, *, minimum: int, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f"DataConfig.{field}={value!r} is invalid; {fix}")


def frame_documents(docs: Sequence[bytes]) -> np.ndarray:
  """The documents as one stream: ``[BOS] + bytes + [EOS]`` per document, concatenated (uint16)."""
  stream = np.empty(sum(len(doc) + 2 for doc in docs), dtype=STREAM_DTYPE)
  position = 0
  for doc in docs:
    stream[position] = BOS
    stream[position + 1:position + 1 + len(doc)] = np.frombuffer(bytes(doc), dtype=np.uint8)
    stream[position + 1 + len(doc)] = EOS
    position += len(doc) + 2
  return stream


def validation_size(num_tokens: int, val_fraction: float) -> int:
  """How many tokens from the end of a stream of ``num_tokens`` form the validation split."""
  # The epsilon keeps float error from dropping a token, e.g. 29 * 0.1 -> 2.9000000000000004 is fine but
  # 100 * 0.29 -> 28.999999999999996 should be 29.
  return min(num_tokens, math.floor(num_tokens * val_fraction + 1e-9))


def split_stream(stream: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation): validation is the last ``floor(len * val_fraction)`` tokens (views, no copy)."""
  boundary = len(stream) - validation_size(len(stream), val_fraction)
  return stream[:boundary], stream[boundary:]


def num_rows(num_tokens: int, seq_len: int) -> int:
  """Rows needed so every token but the first is a target once: ``ceil((num_tokens - 1) / seq_len)``."""
  return max(0, -(-(num_tokens - 1) // seq_len))


def pack_rows(tokens: np.ndarray, seq_len: int, row_index: int) -> dict[str, np.ndarray]:
  """Row ``row_index`` of ``tokens`` (see the module docstring): a dict of four ``[seq_len]`` arrays."""
  if not 0 <= row_index < num_rows(len(tokens), seq_len):
    raise IndexError(f"row {row_index} out of range: {len(tokens)} tokens make "
                     f"{num_rows(len(tokens), seq_len)} rows of length {seq_len}")
  start = row_index * seq_len
  window = np.asarray(tokens[start:start + seq_len + 1], dtype=np.int32)
  row = np.full(seq_len + 1, PAD, dtype=np.int32)
  row[:len(window)] = window
  inputs, targets = row[:-1], row[1:]
  positions = np.arange(seq_len)
  real_input = positions < len(window)
  real_target = positions < len(window) - 1
  # A BOS input opens the next document; shift the count so the row's first token is in document 1.
  opened = np.cumsum(inputs == BOS)
  segment_ids = np.where(real_input, opened - opened[0] + 1, 0).astype(np.int32)
  loss_mask = (real_target & (targets != BOS)).astype(np.float32)
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "loss_mask": loss_mask}


def _padding_row(seq_len: int) -> dict[str, np.ndarray]:
  return {"inputs": np.full(seq_len, PAD, np.int32), "targets": np.full(seq_len, PAD, np.int32),
          "segment_ids": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32)}


def _stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}


def _pack_local_rows(row_ids: np.ndarray, *, tokens: np.ndarray, seq_len: int,
                     local_rows: slice) -> dict[str, np.ndarray]:
  return _stack_rows([pack_rows(tokens, seq_len, int(row_id)) for row_id in row_ids[local_rows]])


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing array fields is ambiguous.
class ByteCorpus:
  """A loaded source, framed into one stream and split into train/validation. Build once, reuse freely."""

  name: str
  train_tokens: np.ndarray
  validation_tokens: np.ndarray
  num_documents: int

  @classmethod
  def load(cls, config: DataConfig) -> ByteCorpus:
    documents = load_documents(config.source, max_bytes=config.max_bytes, data_dir=config.tfds_data_dir)
    return cls.from_documents(documents, config, name=config.source)

  @classmethod
  def from_documents(cls, documents: Sequence[bytes], config: DataConfig, *, name: str = "documents") -> ByteCorpus:
    train_tokens, validation_tokens = split_stream(frame_documents(documents), config.val_fraction)
    corpus = cls(name=name, train_tokens=train_tokens, validation_tokens=validation_tokens,
                 num_documents=len(documents))
    _check_enough_for_a_row(corpus, config.seq_len)
    return corpus


def _check_enough_for_a_row(corpus: ByteCorpus, seq_len: int) -> None:
  if len(corpus.train_tokens) < seq_len + 1:
    raise DataError(f"the train split of {corpus.name!r} has {len(corpus.train_tokens)} tokens, fewer than one "
                    f"row needs (seq_len + 1 = {seq_len + 1}); use a smaller --seq-len "
                    f"(at most {max(len(corpus.train_tokens) - 1, 0)}) or more data")


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only asked when the caller did not say; keeps the data layer importable without touching JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def train_iterator(corpus: ByteCorpus, config: DataConfig, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """Endless, shuffled batches of this process's share of the train split (a checkpointable grain iterator).

  Each batch holds ``config.batch_size / process_count`` rows (see the module docstring for which rows).
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  if config.batch_size % process_count:
    raise DataError(f"batch_size={config.batch_size} is not divisible by the {process_count} processes; use a "
                    f"batch size that is a multiple of {process_count}")
  _check_enough_for_a_row(corpus, config.seq_len)
  rows_per_process = config.batch_size // process_count
  local_rows = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)
  row_ids = grain.MapDataset.range(num_rows(len(corpus.train_tokens), config.seq_len))
  batches = (row_ids.shuffle(seed=config.seed).repeat()
             .batch(config.batch_size, drop_remainder=True)
             .map(functools.partial(_pack_local_rows, tokens=corpus.train_tokens, seq_len=config.seq_len,
                                    local_rows=local_rows)))
  return iter(batches.to_iter_dataset(_READ_OPTIONS))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """All rows of ``tokens`` in order, ``batch_size`` at a time; the last batch is filled with padding rows.

  Every token but the first is a target with ``loss_mask`` 1 exactly once (unless it is a BOS). Works on any
  stream, framed or not: to score a file, pass ``frame_documents([file_bytes])``. Yields nothing when
  ``tokens`` has fewer than two tokens.
  """
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"eval_batches needs seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")
  total_rows = num_rows(len(tokens), seq_len)
  for first_row in range(0, total_rows, batch_size):
    rows = [pack_rows(tokens, seq_len, index) for index in range(first_row, min(first_row + batch_size, total_rows))]
    rows += [_padding_row(seq_len)] * (batch_size - len(rows))
    yield _stack_rows(rows)
