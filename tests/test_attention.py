"""The attention reference op against a float64 brute-force loop, for every mask kind.

The blocked path is called under ``jax.jit`` as the models call it: eagerly, each of its per-diagonal ops would be
compiled on its own (most of these tests' time)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale.ops.attention import attention
from bytescale.ops.mask import AttentionMask, segment_positions
from tests.conftest import assert_close


def brute_force_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale):
  """Independent float64 loop over every (batch, head, query)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  g = k.shape[2]
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      for ti in range(t):
        visible = []
        for si in range(k.shape[1]):
          ok = q_seg[bi, ti] == kv_seg[bi, si] and kv_seg[bi, si] != 0
          if causal:
            ok = ok and kv_pos[bi, si] <= q_pos[bi, ti]
          if window is not None:
            dist = q_pos[bi, ti] - kv_pos[bi, si]
            ok = ok and (dist < window if causal else abs(dist) < window)
          if ok:
            visible.append(si)
        if not visible:
          continue
        scores = np.array([q[bi, ti, hi] @ k[bi, si, gi] * scale for si in visible])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[bi, ti, hi] = sum(w * v[bi, si, gi] for w, si in zip(weights, visible))
  return out


def packed_segments(rng, b, t, with_padding):
  seg = np.zeros((b, t), np.int32)
  for bi in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=2, replace=False))
    seg[bi] = np.searchsorted(cuts, np.arange(t), side="right") + 1
    if with_padding:
      seg[bi, t - 3:] = 0
  return seg


CASES = {
    "causal": dict(causal=True, window=None, segments=False, padding=False),
    "bidirectional": dict(causal=False, window=None, segments=False, padding=False),
    "window": dict(causal=True, window=3, segments=False, padding=False),
    "window_bidirectional": dict(causal=False, window=2, segments=False, padding=False),
    "documents": dict(causal=True, window=None, segments=True, padding=False),
    "documents_padding_window": dict(causal=True, window=4, segments=True, padding=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_float64_loop(case, heads, rng):
  spec = CASES[case]
  b, t, d = 2, 11, 8
  h, g = heads
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, t, g, d)).astype(np.float32)
  v = rng.normal(size=(b, t, g, d)).astype(np.float32)
  seg = packed_segments(rng, b, t, spec["padding"]) if spec["segments"] else np.ones((b, t), np.int32)
  pos = np.asarray(segment_positions(jnp.asarray(seg)))
  mask = AttentionMask.self_attention(pos, seg, causal=spec["causal"], window=spec["window"])
  out = attention(q, k, v, mask, impl="xla")
  expected = brute_force_attention(q, k, v, pos, pos, seg, seg, spec["causal"], spec["window"], d**-0.5)
  assert_close(out, expected, atol=2e-5, what=case)


def test_fully_masked_rows_are_zero_not_nan(rng):
  q = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
  kv = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
  seg = np.array([[1, 1, 0, 0]], np.int32)
  pos = np.arange(4)[None]
  out = np.asarray(attention(q, kv, kv, AttentionMask.self_attention(pos, seg)))
  assert np.isfinite(out).all()
  assert (out[0, 2:] == 0).all()


def test_mask_is_causal_windowed_and_document_local():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  pos = segment_positions(seg)
  mask = np.asarray(AttentionMask.self_attention(pos, seg, causal=True, window=2).dense())[0]
  expected = np.zeros((6, 6), bool)
  for i, j in [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4)]:
    expected[i, j] = True
  np.testing.assert_array_equal(mask, expected)


def test_segment_positions_match_loop(rng):
  seg = packed_segments(rng, 3, 17, with_padding=True)
  expected = np.zeros_like(seg)
  for bi in range(seg.shape[0]):
    for ti in range(1, seg.shape[1]):
      expected[bi, ti] = expected[bi, ti - 1] + 1 if seg[bi, ti] == seg[bi, ti - 1] else 0
  expected[seg == 0] = 0
  np.testing.assert_array_equal(np.asarray(segment_positions(jnp.asarray(seg))), expected)


def test_bad_shapes_and_impl_raise():
  q = np.zeros((1, 4, 3, 8), np.float32)
  kv = np.zeros((1, 4, 2, 8), np.float32)
  pos = np.arange(4)[None]
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention(q, kv, kv, AttentionMask.self_attention(pos))
  with pytest.raises(ValueError, match="impl"):
    attention(kv, kv, kv, AttentionMask.self_attention(pos), impl="fast")
  with pytest.raises(ValueError, match="q_positions_BxT"):
    attention(kv, kv, kv, AttentionMask(pos[:, :3], pos))


# --- The blocked XLA path for packed rows -------------------------------------------------------------------

def _packed_rows(rng, b, t, max_docs=4):
  """Segment ids of packed rows: contiguous documents 1, 2, ... of random lengths, then padding (0)."""
  rows = []
  for _ in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(0, max_docs), replace=False))
    row = np.zeros(t, np.int32)
    for doc, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, t]), start=1):
      row[lo:hi] = doc
    row[t - rng.integers(0, t // 4 + 1):] = 0  # padding at the end
    rows.append(row)
  return np.stack(rows)


@pytest.mark.parametrize("t, window, block", [
    (37, None, 8), (64, None, None), (150, 7, 8), (150, 16, 16), (200, 33, 16), (300, 64, None), (96, 500, 16),
    # (37, None, 8) at 10 blocks instead of 5 (causal, no window, explicit block, ragged last block): slow only.
    pytest.param(150, None, 16, marks=pytest.mark.slow)])
def test_blocked_packed_attention_equals_the_float64_loop(t, window, block):
  from bytescale.ops.attention import blocked_packed_attention

  rng = np.random.default_rng(t + (window or 0))
  b, h, g, d = 2, 4, 2, 8
  seg = _packed_rows(rng, b, t)
  seg[0, t // 3:t // 3 + 5] = 0  # padding inside a row as well as at its end; a document resumes after it
  seg[0, t // 3 + 5:] = np.where(seg[0, t // 3 + 5:] != 0, seg[0, t // 3 + 5:] + 100, 0)
  q, k, v = (rng.normal(size=(b, t, n, d)).astype(np.float32) for n in (h, g, g))
  mask = AttentionMask.packed_row(jnp.asarray(seg), window=window)
  out = jax.jit(lambda *a: blocked_packed_attention(*a, mask, block=block))(*map(jnp.asarray, (q, k, v)))
  pos = np.asarray(segment_positions(jnp.asarray(seg)))
  expected = brute_force_attention(q, k, v, pos, pos, seg, seg, True, window, d**-0.5)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("g", [1, 2])
def test_blocked_packed_attention_gradients_equal_the_dense_path(g):
  from bytescale.ops.attention import attention_reference, blocked_packed_attention

  rng = np.random.default_rng(g)
  b, t, h, d = 2, 96, 4, 8
  seg = _packed_rows(rng, b, t)
  seg[1, 30:41] = 0  # padding between two documents: its queries see nothing and nothing sees it
  seg = jnp.asarray(seg)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, g, g))
  w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  for window in (None, 20):
    mask = AttentionMask.packed_row(seg, window=window)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a, mask) * w)  # noqa: E731
    blocked = jax.jit(jax.grad(loss(lambda *a: blocked_packed_attention(*a, block=16)), argnums=(0, 1, 2)))(q, k, v)
    dense = jax.jit(jax.grad(loss(attention_reference), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(blocked, dense):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-4)


def test_banded_schedule_unrolled_equals_the_float64_loop_and_the_dense_gradients():
  """A window shorter than the row takes the banded schedule; unrolled (as ``flops.xla_flops`` traces it) it must
  give what the float64 loop gives, and the dense path's gradients."""
  from bytescale.ops.attention import attention_reference, blocked_packed_attention

  rng = np.random.default_rng(5)
  b, t, h, g, d, window = 2, 70, 4, 2, 8, 12  # blocks of 8: bands of 3 blocks, a ragged last block
  seg = _packed_rows(rng, b, t)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, g, g))
  w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  mask = AttentionMask.packed_row(jnp.asarray(seg), window=window)
  unrolled = lambda *a: blocked_packed_attention(*a, mask, unroll=True)  # noqa: E731
  pos = np.asarray(segment_positions(jnp.asarray(seg)))
  expected = brute_force_attention(q, k, v, pos, pos, seg, seg, True, window, d**-0.5)
  np.testing.assert_allclose(np.asarray(jax.jit(unrolled)(q, k, v)), expected, atol=2e-5, rtol=2e-5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
  got = jax.jit(jax.grad(loss(unrolled), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(lambda *a: attention_reference(*a, mask)), argnums=(0, 1, 2)))(q, k, v)
  for got_x, want_x in zip(got, want):
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("window", [None, 90])
def test_loop_schedule_unrolled_equals_the_float64_loop_and_the_dense_gradients(window):
  """Causal rows (or a window as long as the row) take the loop schedule, whose trip counts skip the blocks only
  other documents or padding see; unrolled (as ``flops.xla_flops`` traces it) it visits every causal pair. Both
  must give what the float64 loop gives, and the dense path's gradients."""
  from bytescale.ops.attention import attention_reference, blocked_packed_attention

  rng = np.random.default_rng(7)
  b, t, h, g, d = 2, 70, 4, 2, 8  # blocks of 8: a ragged last block
  seg = _packed_rows(rng, b, t, max_docs=4)
  seg[1, 20:37] = 0  # two whole blocks of padding inside a row: no query there sees a key, no key there is seen
  seg[1, 37:] = np.where(seg[1, 37:] != 0, seg[1, 37:] + 100, 0)  # a new document after it
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, g, g))
  w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  mask = AttentionMask.packed_row(jnp.asarray(seg), window=window)
  pos = np.asarray(segment_positions(jnp.asarray(seg)))
  expected = brute_force_attention(q, k, v, pos, pos, seg, seg, True, window, d**-0.5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
  want = jax.jit(jax.grad(loss(lambda *a: attention_reference(*a, mask)), argnums=(0, 1, 2)))(q, k, v)
  for unroll in (False, True):
    blocked = lambda *a, unroll=unroll: blocked_packed_attention(*a, mask, block=8, unroll=unroll)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(blocked)(q, k, v)), expected, atol=2e-5, rtol=2e-5)
    got = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
    for got_x, want_x in zip(got, want):
      np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), atol=2e-5, rtol=2e-4)


def test_packed_row_mask_is_the_self_attention_mask_of_contiguous_documents():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [3, 3, 3, 1, 1, 1]])
  packed = AttentionMask.packed_row(seg, window=2)
  pos = segment_positions(seg)
  plain = AttentionMask.self_attention(pos, seg, causal=True, window=2)
  np.testing.assert_array_equal(np.asarray(packed.dense()), np.asarray(plain.dense()))
  assert packed.packed and not plain.packed
  # An id that comes back after another one starts a new document (positions restart there too).
  again = AttentionMask.packed_row(jnp.asarray([[1, 1, 2, 1]])).dense()[0]
  assert not bool(again[3, 0]) and not bool(again[3, 1]) and bool(again[3, 3])


def test_xla_dispatch_takes_the_blocked_path_for_long_packed_rows(monkeypatch):
  from bytescale.ops import attention as attention_ops

  calls = []
  original = attention_ops.blocked_packed_attention
  monkeypatch.setattr(attention_ops, "blocked_packed_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
  rng = np.random.default_rng(1)
  seg = jnp.asarray(_packed_rows(rng, 1, 300))
  q = jnp.asarray(rng.normal(size=(1, 300, 2, 8)), jnp.float32)
  mask = AttentionMask.packed_row(seg, window=64)
  out = jax.jit(lambda q: attention(q, q, q, mask, impl="xla"))(q)  # dispatch happens once, when it is traced
  assert calls == [1]
  np.testing.assert_allclose(np.asarray(out), np.asarray(attention_ops.attention_reference(q, q, q, mask)),
                             atol=2e-5, rtol=2e-5)
  attention(q[:, :64], q[:, :64], q[:, :64], AttentionMask.packed_row(seg[:, :64], window=64), impl="xla")
  assert calls == [1]  # one block: the dense path
