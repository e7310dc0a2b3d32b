"""Pure helpers for fixed-size patches (MegaByte): the patch grid, the one-patch shift and the document rule.

Indexing. A row of ``T`` input ids ``y_0 .. y_{T-1}`` is the model's *stream*. MegaByte predicts stream byte ``j``
from bytes ``< j`` at *local position* ``j``; the protocol's output ``t`` (the prediction of the byte after
``y_t``) is therefore local position ``t + 1``. Local positions ``0 .. U-1`` with ``U = P * ceil((T + 1) / P)`` form
``M = U / P`` patches; patch ``m`` holds local positions ``mP .. mP+P-1``. Its global context comes from global
position ``m``, whose input is input patch ``m - 1`` (stream bytes ``(m-1)P .. mP-1``; a trainable pad patch for
``m = 0``), so global position ``m`` sees exactly the bytes before local position ``mP``.

Documents. Local position ``j >= 1`` belongs to the document of the output it produces, i.e. of stream byte
``j - 1``. Position 0 (the paper's prediction of byte 0 from nothing, not an output) belongs to the document of
byte 0: as in the paper it is a key the later positions of patch 0 attend to, and it holds no byte. The rule for
patches that straddle documents:

* the *owner* of patch ``m`` (and of global position ``m``) is the document of its first local position that
  belongs to a document (0 = none);
* global position ``m``'s input keeps only the owner's bytes; every other slot of input patch ``m - 1`` is the
  matching slice of the pad patch;
* global attention connects positions with the same owner (segment ids = owners);
* a local position of another document than its patch's owner gets no global context (zero);
* local attention connects local positions of the same document (segment ids), and the previous-byte embedding
  of local position ``j`` is that of byte ``j - 1``, which is by definition in ``j``'s document.

So every output sees all bytes of its own document up to itself and nothing of any other document: a document
that does not own a patch it appears in started inside that patch, so it has no bytes before the patch.
"""

from __future__ import annotations

import jax.numpy as jnp


def num_local_positions(seq_len: int, patch_size: int) -> int:
  """``U``: local positions ``0 .. seq_len`` (one per output plus position 0), rounded up to whole patches."""
  return -(-(seq_len + 1) // patch_size) * patch_size


def pad_axis1(x_BxT, length: int, fill):
  """``x`` right-padded with ``fill`` along axis 1 to ``length``."""
  pad = length - x_BxT.shape[1]
  if pad < 0:
    raise ValueError(f"cannot pad length {x_BxT.shape[1]} down to {length}")
  widths = [(0, 0)] * x_BxT.ndim
  widths[1] = (0, pad)
  return jnp.pad(x_BxT, widths, constant_values=fill)


def local_segments(stream_segments_BxU):
  """Document of each local position: that of stream byte ``j - 1`` (of byte 0 for position 0)."""
  return jnp.concatenate([stream_segments_BxU[:, :1], stream_segments_BxU[:, :-1]], axis=1)


def patch_owners(local_segments_BxMxP):
  """Owner of each patch: the document of its first local position that has one (0 if none)."""
  first = jnp.argmax(local_segments_BxMxP != 0, axis=-1)
  return jnp.take_along_axis(local_segments_BxMxP, first[..., None], axis=-1)[..., 0]


def shift_patches(x_BxMx___, first_Bx1x___):
  """The one-patch shift: ``first`` then patches ``0 .. M-2`` (the last patch is dropped)."""
  return jnp.concatenate([first_Bx1x___, x_BxMx___[:, :-1]], axis=1)


def global_input_keep(stream_segments_BxMxP, owners_BxM):
  """Which slots of global position ``m``'s input (input patch ``m - 1``) hold a byte of ``m``'s owner."""
  previous_BxMxP = shift_patches(stream_segments_BxMxP, jnp.zeros_like(stream_segments_BxMxP[:, :1]))
  owners = owners_BxM[..., None]
  return (previous_BxMxP == owners) & (owners != 0)


def has_global_context(local_segments_BxMxP, owners_BxM):
  """Which local positions receive their patch's global context (they belong to the patch's owner)."""
  owners = owners_BxM[..., None]
  return (local_segments_BxMxP == owners) & (owners != 0)
