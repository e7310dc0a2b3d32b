"""segment_pool (xla and Pallas interpret) and its dense reference against a brute-force numpy loop."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale.kernels import patch_pool
from bytescale.ops.pooling import segment_pool, segment_pool_reference


def brute_force(x, ids, n, op, w):
  """Loop over (batch, segment, feature): pooled values and d(sum(w * pooled))/dx, in float64."""
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  out = np.zeros((b, n, d))
  grad = np.zeros_like(x)
  for bi in range(b):
    for si in range(n):
      members = [ti for ti in range(t) if ids[bi, ti] == si]
      if not members:
        continue  # empty segment: 0, no gradient
      for di in range(d):
        vals = [x[bi, ti, di] for ti in members]
        if op == "sum":
          out[bi, si, di] = sum(vals)
          for ti in members:
            grad[bi, ti, di] += w[bi, si, di]
        elif op == "mean":
          out[bi, si, di] = sum(vals) / len(vals)
          for ti in members:
            grad[bi, ti, di] += w[bi, si, di] / len(vals)
        else:
          best = members[int(np.argmax(vals))]  # np.argmax: first occurrence of the maximum
          out[bi, si, di] = x[bi, best, di]
          grad[bi, best, di] += w[bi, si, di]
  return out, grad


def make_case(name, b, t, d, n, layout, dtype):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  # Small integers: many exact ties, so the max tie rule is exercised (and values are exact in bf16).
  x = rng.integers(-4, 5, size=(b, t, d)).astype(np.float32)
  if layout == "patches":  # ragged, non-decreasing, with ids below 0 (prefix) and >= n (suffix) to ignore
    lengths = rng.integers(1, 8, size=(b, t))
    ids = np.stack([np.repeat(np.arange(t), lengths[i])[:t] for i in range(b)]) - 1
    ids[:, -5:] = n + 2
  else:  # arbitrary ids: not contiguous, not sorted
    ids = rng.integers(-2, n + 3, size=(b, t))
  w = rng.normal(size=(b, n, d)).astype(np.float32)
  return jnp.asarray(x, dtype), ids.astype(np.int32), w


CASES = {
    # name: (B, T, D, N, layout, dtype)
    "patches": (2, 45, 24, 12, "patches", jnp.float32),
    "patches_bf16_wide": (1, 70, 130, 20, "patches", jnp.bfloat16),
    "unsorted_ids": (2, 33, 8, 9, "random", jnp.float32),
}


def run(fn, x, ids, w):
  ids_j, w_j = jnp.asarray(ids), jnp.asarray(w)
  out, vjp = jax.vjp(lambda x_: fn(x_, ids_j).astype(jnp.float32), x)
  (grad,) = vjp(w_j)
  return np.asarray(out, np.float64), np.asarray(grad, np.float64)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_segment_pool_matches_brute_force(impl, op, case):
  b, t, d, n, layout, dtype = CASES[case]
  x, ids, w = make_case(case, b, t, d, n, layout, dtype)
  if impl == "reference":
    fn = lambda x_, i_: segment_pool_reference(x_, i_, n, op)
  elif impl == "pallas":  # small blocks: several patch, token and feature blocks per row
    fn = lambda x_, i_: patch_pool.patch_pool(x_, i_, n, op, block_t=16, block_n=8, block_d=64 if d > 64 else None)
  else:
    fn = lambda x_, i_: segment_pool(x_, i_, n, op, impl=impl)
  out, grad = run(fn, x, ids, w)
  want_out, want_grad = brute_force(np.asarray(x, np.float32), ids, n, op, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: mean and output rounding
  assert not np.isnan(out).any() and not np.isnan(grad).any()
  np.testing.assert_allclose(out, want_out, atol=tol, rtol=tol, err_msg=f"{impl} {op} {case} forward")
  np.testing.assert_allclose(grad, want_grad, atol=tol, rtol=tol, err_msg=f"{impl} {op} {case} gradient")
  assert fn(x, jnp.asarray(ids)).dtype == dtype


def test_segment_pool_pallas_via_public_api_and_jit():
  x, ids, w = make_case("api", 2, 40, 16, 10, "patches", jnp.float32)
  f = jax.jit(lambda x_, i_: segment_pool(x_, i_, 10, "max", impl="pallas"))
  out, grad = run(f, x, ids, w)
  want_out, want_grad = brute_force(np.asarray(x), ids, 10, "max", w)
  np.testing.assert_allclose(out, want_out, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_out_of_range_ids_and_empty_segments():
  x = jnp.arange(1.0, 7.0).reshape(1, 6, 1)
  ids = jnp.asarray([[-1, 0, 0, 5, 2, 9]])  # 5 and 9 are >= num_segments; segment 1 is empty
  for impl in ("xla", "pallas"):
    for op, want in (("sum", [5, 0, 5, 0]), ("mean", [2.5, 0, 5, 0]), ("max", [3, 0, 5, 0])):
      out = segment_pool(x, ids, 4, op, impl=impl)
      np.testing.assert_array_equal(np.asarray(out)[0, :, 0], want, err_msg=f"{impl} {op}")


def test_auto_is_xla_on_cpu(monkeypatch):
  def boom(*args, **kwargs):
    raise AssertionError("auto must not pick the Pallas kernel on CPU")

  monkeypatch.setattr(patch_pool, "patch_pool", boom)
  x, ids, _ = make_case("auto", 1, 10, 4, 3, "patches", jnp.float32)
  segment_pool(x, jnp.asarray(ids), 3, "mean")


def test_bad_arguments():
  x = jnp.zeros((1, 4, 2))
  with pytest.raises(ValueError, match="op"):
    segment_pool(x, jnp.zeros((1, 4), jnp.int32), 2, "median")
  with pytest.raises(ValueError, match="impl"):
    segment_pool(x, jnp.zeros((1, 4), jnp.int32), 2, "sum", impl="cuda")
  with pytest.raises(ValueError, match="BxT"):
    segment_pool(x, jnp.zeros((1, 5), jnp.int32), 2, "sum")
