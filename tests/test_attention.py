"""The attention reference op against a float64 brute-force loop, for every mask kind."""

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
