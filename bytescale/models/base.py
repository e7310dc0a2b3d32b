"""The protocol every bytescale model speaks.

Every model offers:

* ``__call__(bytes_BxT, segment_ids_BxT=None, *, patches=None) -> ModelOutput``: next-byte logits and the
  byte-level hidden states they are read from (multi-token heads reuse them);
* ``unembed(hidden_BxTxD) -> logits_BxTxV``: the output projection, shared with multi-token heads;
* ``init_cache(batch, max_len)`` and ``decode(cache, bytes_BxN) -> (ModelOutput, cache)``: N >= 1 bytes per
  row appended at once (speculative verification feeds several);
* ``rollback(cache, n_B) -> cache``: forget the last ``n_B`` bytes of each row (rejected draft bytes).

``bytes_BxT`` are token ids (see ``bytescale.vocab``); ``segment_ids_BxT`` number the documents packed in a
row (0 = padding); tokens never attend across documents. Which models exist, their configs, presets and FLOP
counters: the one table in ``bytescale.models.registry``.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax


class ModelOutput(NamedTuple):
  logits_BxTxV: jax.Array
  hidden_BxTxD: jax.Array


def check_inputs(bytes_BxT, segment_ids_BxT=None):
  """The protocol's input contract, checked on static shapes (free under jit): ``BxT`` integer ids, and segment
  ids of the same shape."""
  chex.assert_rank(bytes_BxT, 2)
  chex.assert_type(bytes_BxT, int)
  if segment_ids_BxT is not None:
    chex.assert_equal_shape([bytes_BxT, segment_ids_BxT])
    chex.assert_type(segment_ids_BxT, int)
