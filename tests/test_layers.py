"""Layers against plain numpy float64 formulas."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bytescale.nn.layers import RMSNorm, SwiGLU
from bytescale.ops.rope import apply_rope, default_inverse_frequencies
from tests.conftest import assert_close


def test_rms_norm_matches_numpy(rng):
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  norm = RMSNorm(16, eps=1e-5, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  x64 = x.astype(np.float64)
  expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(norm.scale[...], np.float64)
  assert_close(norm(x), expected, atol=1e-5)


def test_swiglu_matches_numpy(rng):
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  mlp = SwiGLU(8, 12, rngs=nnx.Rngs(1))
  g, u, d = (np.asarray(w[...], np.float64) for w in (mlp.w_gate, mlp.w_up, mlp.w_down))
  a = x @ g
  expected = ((a / (1 + np.exp(-a))) * (x @ u)) @ d
  assert_close(mlp(x), expected, atol=1e-5)


def test_rope_half_split_matches_numpy(rng):
  x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 5, 9, 100]])
  inv = default_inverse_frequencies(8, 10000.0)
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
  expected = np.empty_like(x, dtype=np.float64)
  for t in range(6):
    for i in range(4):
      angle = pos[0, t] * 10000.0 ** (-2 * i / 8)
      c, s = np.cos(angle), np.sin(angle)
      a, b = x[0, t, :, i].astype(np.float64), x[0, t, :, i + 4].astype(np.float64)
      expected[0, t, :, i] = a * c - b * s
      expected[0, t, :, i + 4] = b * c + a * s
  assert_close(out, expected, atol=1e-5)


def test_every_remat_name_has_a_policy():
  """``configs.REMAT_POLICY_NAMES`` (what configs accept) and ``nn.transformer.REMAT_POLICIES`` (what each saves)
  name the same policies; "none" means no remat."""
  from bytescale.configs import REMAT_POLICY_NAMES
  from bytescale.nn.transformer import REMAT_POLICIES

  assert {"none", *REMAT_POLICIES} == set(REMAT_POLICY_NAMES)
