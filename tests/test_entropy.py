"""Entropies: float32 math, overlapping windows for long rows, document isolation, threshold calibration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale import entropy, patching
from bytescale.models import ByteLM
from bytescale.patching import PatchingConfig
from tests.conftest import assert_close, tiny_bytelm_config

CONTEXT = 16


@pytest.fixture(scope="module")
def lm():
  """Sliding window 4, 2 layers: a byte's entropy depends on its last 2 * (4 - 1) = 6 bytes only."""
  config = dataclasses.replace(tiny_bytelm_config(window=4), max_seq_len=CONTEXT)
  return ByteLM(config, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def entropies(lm):
  """``compute_entropies`` of ``lm``, jitted with the weights as an argument (compiled once per shape)."""
  graphdef, state = nnx.split(lm)
  fn = jax.jit(lambda state, ids, segs, overlap: entropy.compute_entropies(
      nnx.merge(graphdef, state), ids, segs, context=CONTEXT, overlap=overlap), static_argnums=3)
  return lambda ids, segs=None, overlap=8: fn(state, ids, jnp.ones_like(ids) if segs is None else segs, overlap)


def test_entropy_from_logits_matches_float64(rng):
  logits = rng.normal(size=(2, 5, 260)) * 4
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = -(p * np.log(p)).sum(-1)
  got = entropy.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  assert got.dtype == jnp.float32
  assert_close(entropy.entropy_from_logits(jnp.asarray(logits, jnp.float32)), expected, atol=1e-5)


@pytest.mark.parametrize("seq_len,overlap", [(16, None), (17, None), (50, 8), (61, 12)])
def test_window_layout_covers_every_byte_with_enough_context(seq_len, overlap):
  starts, owned = entropy.window_layout(seq_len, CONTEXT, overlap)
  overlap = CONTEXT // 2 if overlap is None else overlap
  owner = {}
  for i, (start, first) in enumerate(zip(starts, owned)):
    last = owned[i + 1] if i + 1 < len(owned) else seq_len
    for j in range(first, last):
      assert j not in owner
      owner[j] = i
      assert start <= j < start + CONTEXT
      assert j - start >= overlap or start == 0  # at least `overlap` bytes of left context
  assert sorted(owner) == list(range(seq_len))


def test_long_rows_use_overlapping_windows(lm, entropies, rng):
  """Beyond the context, windows overlap by more than the model's receptive field, so every entropy equals the
  one from a single pass over the whole row (which this sliding-window model can also compute)."""
  ids = jnp.asarray(rng.integers(0, 256, size=(2, 61)), jnp.int32)
  full = entropy.entropy_from_logits(lm(ids).logits_BxTxV)
  windowed = entropies(ids)
  assert windowed.dtype == jnp.float32
  assert_close(windowed, full, atol=2e-5)
  # Windows without overlap reset the context at each window start and get different entropies there.
  reset = entropies(ids, overlap=0)
  assert float(jnp.max(jnp.abs(reset - full))) > 1e-3


def test_entropies_never_cross_documents(entropies, rng):
  """Packed documents (and padding) get the entropies each document gets alone, in windows too."""
  a, b = rng.integers(0, 256, size=23), rng.integers(0, 256, size=30)
  ids = np.zeros((2, 56), np.int32)
  ids[0] = np.concatenate([a, b, [0, 0, 0]])
  ids[1, :30] = b
  segs = np.zeros((2, 56), np.int32)
  segs[0] = [1] * 23 + [2] * 30 + [0] * 3
  segs[1, :30] = 1
  got = entropies(jnp.asarray(ids), jnp.asarray(segs))
  alone_a = entropies(jnp.asarray(np.pad(a, (0, 33))[None].repeat(2, 0)), jnp.asarray((segs == 1).astype(np.int32)))
  assert_close(got[0, 23:53], got[1, :30], atol=2e-5)
  assert_close(got[0, :23], alone_a[0, :23], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got[0, 53:]), 0.0)


@pytest.mark.parametrize("field", ["threshold", "monotonic_threshold"])
@pytest.mark.parametrize("target", [2.0, 4.5])
def test_threshold_for_patch_size(field, target, rng):
  h = rng.gamma(2.0, 0.8, size=(4, 200)).astype(np.float32)
  segs = np.ones((4, 200), np.int32)
  segs[1, 100:] = 2
  config = (PatchingConfig("entropy", max_patch_length=12) if field == "threshold"
            else PatchingConfig("entropy", threshold=None, monotonic_threshold=0.0))
  value, achieved = entropy.threshold_for_patch_size(h, segs, target, config, field=field)
  assert abs(achieved - target) / target < 0.05
  # Cross-check the achieved size with the patcher itself, counted by hand.
  tuned = dataclasses.replace(config, **{field: value})
  p = patching.patch(tuned, jnp.zeros((4, 200), jnp.int32), jnp.asarray(segs), entropies_BxT=jnp.asarray(h),
                     max_patches=200)
  assert achieved == pytest.approx(800 / int(p.valid_BxM.sum()), rel=1e-6)
  assert entropy.average_patch_size(tuned, jnp.asarray(h), jnp.asarray(segs)) == pytest.approx(achieved, rel=1e-6)
