"""Parameter helper, RMSNorm, SwiGLU MLP and embeddings."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, init, shape, names: tuple[str, ...]) -> nnx.Param:
  """A float32 parameter tagged with logical axis names.

  Sharding is not applied here (``eager_sharding=False``): ``bytescale.parallel`` maps the names to mesh axes
  with its one rules table and places the whole state at once.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False)


def scaled_normal(fan_in: int):
  return jax.nn.initializers.normal(stddev=fan_in**-0.5)


def dense(x, w, *, contract: int = 1):
  """``x`` (``...`` then ``w.shape[:contract]``) times ``w``: ``...`` then ``w.shape[contract:]``, as one 2-D matmul.

  Leading axes are merged and weight axes flattened first because XLA:CPU lays out the gradients of batched
  einsums (``btd,df->btf``) through slow transposes: a SwiGLU MLP forward and backward ran 2x slower that way.
  """
  k = math.prod(w.shape[:contract])
  lead = x.shape[:x.ndim - contract]
  if x.shape[x.ndim - contract:] != w.shape[:contract]:
    raise ValueError(f"dense: input axes {x.shape[x.ndim - contract:]} do not match weight axes {w.shape[:contract]}")
  out = jnp.reshape(x, (-1, k)) @ jnp.reshape(w, (k, -1))
  return out.reshape(*lead, *w.shape[contract:])


def rms_norm(x, scale, eps: float):
  """RMSNorm in float32, cast back to the input dtype. Under ``grad`` the backward pass recomputes it from ``x``
  (elementwise, same values): the step does not keep the normalised copy of every normed activation (BLT
  ``small``'s step: 702 -> 571 MB of XLA temporaries)."""
  return _rms_norm(x, scale, float(eps))


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _rms_norm(x, scale, eps: float):
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (normed * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",))

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)


class SwiGLU(nnx.Module):
  """``down(silu(x @ gate) * (x @ up))``, no biases."""

  def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.w_gate = param(rngs, scaled_normal(d_model), (d_model, hidden), ("embed", "mlp"))
    self.w_up = param(rngs, scaled_normal(d_model), (d_model, hidden), ("embed", "mlp"))
    self.w_down = param(rngs, scaled_normal(hidden), (hidden, d_model), ("mlp", "embed"))

  def __call__(self, x_BxTxD):
    x = x_BxTxD.astype(self.dtype)
    gate = dense(x, self.w_gate[...].astype(self.dtype))
    up = dense(x, self.w_up[...].astype(self.dtype))
    return _gated_down(gate, up, self.w_down[...].astype(self.dtype))


@jax.checkpoint
def _gated_down(gate, up, w_down):
  """``dense(silu(gate) * up, w_down)``, its backward pass recomputing ``silu(gate) * up`` from ``gate`` and ``up``
  (elementwise, same values) instead of keeping it and silu's intermediates: a training step then holds two
  hidden-width arrays per layer fewer (BLT ``small``'s step: 863 -> 702 MB of XLA temporaries)."""
  return dense(jax.nn.silu(gate) * up, w_down)


class Embedding(nnx.Module):
  """A lookup table ``VxD``; ``attend`` multiplies by its transpose (tied unembedding)."""

  def __init__(self, num_embeddings: int, dim: int, *, names=("vocab", "embed"), rngs: nnx.Rngs):
    self.table = param(rngs, jax.nn.initializers.normal(stddev=1.0), (num_embeddings, dim), names)

  def __call__(self, ids):
    return jnp.take(self.table[...], ids, axis=0)

  def attend(self, x_BxTxD):
    return dense(x_BxTxD, self.table[...].astype(x_BxTxD.dtype).T)


def unembed(norm: RMSNorm, hidden_BxTxD, *, kernel_DxV=None, embedding: Embedding | None = None):
  """The unembedding every model shares: final norm, then the output matrix ``kernel_DxV`` or, tied, the
  transpose of ``embedding``'s table. Logits in float32."""
  h = norm(hidden_BxTxD)
  if embedding is not None:
    return embedding.attend(h.astype(jnp.float32))
  return dense(h, kernel_DxV[...].astype(h.dtype)).astype(jnp.float32)
