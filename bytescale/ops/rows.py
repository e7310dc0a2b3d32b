"""Per-row reads and writes of buffers indexed by position (caches, byte buffers): each batch row at its own offset.

A buffer is ``BxS...`` (any trailing dims); ``start_B`` / ``index_BxN`` are int32 positions along axis 1.
Writes and slices follow ``lax.dynamic_update_slice`` / ``dynamic_slice``: a start that would run past the end is
clamped so the block fits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_rows(buffer_BxS, new_BxN, start_B, *, axis: int = 1):
  """``buffer`` with ``new[b]`` written at positions ``start[b] .. start[b] + N - 1`` of row b (cast to the
  buffer's dtype). ``axis``: where the positions are in ``buffer`` and ``new`` (batch first, same layout; e.g.
  slots after the heads in a ``BxGxSxK`` cache, ``axis=2``)."""
  write = lambda row, new, start: jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=axis - 1)
  return jax.vmap(write)(buffer_BxS, new_BxN.astype(buffer_BxS.dtype), start_B)


def read_rows(buffer_BxS, start_B, size: int):
  """``BxN...``: positions ``start[b] .. start[b] + size - 1`` of each row b (``N = size``)."""
  return jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, size, axis=0))(buffer_BxS, start_B)


def take_rows(buffer_BxS, index_BxN):
  """``BxN...``: ``buffer[b, index[b, n]]``."""
  return jax.vmap(lambda row, index: jnp.take(row, index, axis=0))(buffer_BxS, index_BxN)
