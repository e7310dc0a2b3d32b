"""Rotary position embeddings (half-split convention: feature i pairs with feature i + d/2)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def default_inverse_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
  """``w_i = theta^(-2i/d)`` for ``i < d/2``, in float64 on the host."""
  if rotary_dim % 2:
    raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
  return theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def rope_angles(positions_BxT, inv_freq_F):
  """Angles ``m * w_i`` in float32, ``BxTxF``."""
  return positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F, jnp.float32)


def apply_rope(x_BxTxHxK, positions_BxT, inv_freq_F, attention_scale: float = 1.0):
  """Rotates the first ``2*F`` features of every head by the angles of ``positions`` (half-split pairs)."""
  angles_BxTxF = rope_angles(positions_BxT, inv_freq_F)
  cos = (jnp.cos(angles_BxTxF) * attention_scale)[:, :, None, :]
  sin = (jnp.sin(angles_BxTxF) * attention_scale)[:, :, None, :]
  rotary = 2 * angles_BxTxF.shape[-1]
  x_rot, x_pass = x_BxTxHxK[..., :rotary], x_BxTxHxK[..., rotary:]
  x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxK.dtype)
  return jnp.concatenate([rotated, x_pass], axis=-1) if x_pass.shape[-1] else rotated


# --- Configuration -----------------------------------------------------------------------------------------
# Keys follow Hugging Face's `rope_scaling` names so published configs load as they are. The full family of
# context-extension methods (linear, ntk, dynamic, yarn, llama3, longrope) lives in this module.

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  rope_type: str = "default"
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.rope_type != "default":
      raise ValueError(f"RopeConfig.rope_type: unknown {self.rope_type!r}; use 'default'")
    if not self.rope_theta > 1:
      raise ValueError(f"RopeConfig.rope_theta must be > 1, got {self.rope_theta}")


def rotate(x_BxTxHxK, positions_BxT, config: RopeConfig, *, seq_len=None):
  """Applies the rotary embedding described by ``config`` to every head of ``x``.

  ``seq_len`` is the current total length (for methods that switch or rescale with length); may be traced.
  """
  del seq_len
  inv_freq = default_inverse_frequencies(x_BxTxHxK.shape[-1], config.rope_theta)
  return apply_rope(x_BxTxHxK, positions_BxT, inv_freq)
