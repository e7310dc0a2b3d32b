"""bytescale's data layer: sources of documents, byte framing and packing, and grain input pipelines.

Typical use::

  config = DataConfig(source="stdlib", seq_len=256, batch_size=8)
  corpus = ByteCorpus.load(config)
  batches = train_iterator(corpus, config)          # endless, shuffled, checkpointable
  for batch in eval_batches(corpus.validation_tokens, seq_len=256, batch_size=8): ...

The tfds builder for local files lives in :mod:`bytescale.data.tfds_builder` (imported on demand, as it
pulls in tensorflow_datasets).
"""

from bytescale.data.pipeline import (
    BATCH_KEYS,
    ByteCorpus,
    DataConfig,
    eval_batches,
    frame_documents,
    num_rows,
    pack_rows,
    split_stream,
    train_iterator,
)
from bytescale.data.sources import DataError, load_documents

__all__ = [
    "BATCH_KEYS",
    "ByteCorpus",
    "DataConfig",
    "DataError",
    "eval_batches",
    "frame_documents",
    "load_documents",
    "num_rows",
    "pack_rows",
    "split_stream",
    "train_iterator",
]
