"""Pallas flash attention (interpret mode on CPU) against an independent float64 numpy reference.

Every case checks the forward output and dq/dk/dv (gradients of a random-weighted sum) with kernel outputs
poisoned to NaN beforehand, so a block the kernels forget to write fails the test. Both kernel variants run:
resident (the CPU/GPU default) on every case, streaming (the TPU default) on one case per mask kind.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale.kernels import cudnn_attention, flash_attention as fa
from bytescale.ops.mask import AttentionMask, segment_positions


# ---------------------------------------------------------------------------------------------------------
# Float64 numpy reference: mask, softmax, and the analytic backward, written independently of the kernels.


def np_mask(q_pos, kv_pos, q_seg, kv_seg, causal, window):
  qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
  mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
  if causal:
    mask &= kp <= qp
  if window is not None:
    dist = qp - kp
    mask &= (dist < window) if causal else (np.abs(dist) < window)
  return mask  # BxTxS


def np_attention_and_grads(q, k, v, w, mask_BxTxS, scale):
  """Returns out, dq, dk, dv of ``sum(w * attention(q, k, v))`` in float64."""
  q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
  b, t, h, d = q.shape
  g = k.shape[2]
  kh = np.repeat(k, h // g, axis=2)  # BxSxHxK: query head i uses kv head i // (h // g)
  vh = np.repeat(v, h // g, axis=2)
  m = mask_BxTxS[:, None]  # Bx1xTxS
  s = np.einsum("bthd,bshd->bhts", q, kh) * scale
  s = np.where(m, s, -np.inf)
  row_max = np.max(s, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(m, np.exp(s - row_max), 0.0)
  denom = e.sum(-1, keepdims=True)
  p = e / np.where(denom == 0, 1.0, denom)  # fully masked rows: p = 0
  out = np.einsum("bhts,bshd->bthd", p, vh)
  do = w
  dvh = np.einsum("bhts,bthd->bshd", p, do)
  dp = np.einsum("bthd,bshd->bhts", do, vh)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  dq = np.einsum("bhts,bshd->bthd", ds, kh) * scale
  dkh = np.einsum("bhts,bthd->bshd", ds, q) * scale
  group = lambda x: x.reshape(b, x.shape[1], g, h // g, d).sum(3)  # sum the query heads of each kv head
  return out, dq, group(dkh), group(dvh)


# ---------------------------------------------------------------------------------------------------------
# Cases.

CASES = {
    # name: (B, T, S, H, G, K, causal, window, layout, dtype, block_q, block_k)
    "causal": (2, 37, 37, 4, 2, 32, True, None, "plain", jnp.float32, 16, 16),
    "noncausal_cross_T_ne_S": (1, 33, 45, 2, 1, 32, False, None, "plain", jnp.float32, 16, 32),
    "window_causal": (2, 70, 70, 4, 2, 32, True, 12, "plain", jnp.float32, 16, 16),
    "window_noncausal": (1, 50, 50, 2, 2, 32, False, 9, "plain", jnp.float32, 16, 16),
    "documents": (2, 64, 64, 4, 2, 32, True, None, "documents", jnp.float32, 16, 16),
    "documents_window": (1, 72, 72, 2, 1, 32, True, 7, "documents", jnp.float32, 16, 16),
    "padding": (2, 45, 45, 4, 4, 32, True, None, "padding", jnp.float32, 16, 16),
    "patch_cross_attention": (2, 20, 61, 2, 2, 32, False, None, "patches", jnp.float32, 16, 16),
    "mqa_g1_head64": (1, 40, 40, 4, 1, 64, True, None, "plain", jnp.float32, 16, 32),
    "bf16_causal": (2, 37, 37, 4, 2, 32, True, None, "plain", jnp.bfloat16, 16, 16),
    "bf16_documents_window_head128": (1, 48, 48, 4, 2, 128, True, 16, "documents", jnp.bfloat16, 32, 16),
    "bf16_padding_window_head256": (1, 80, 80, 2, 1, 256, True, 24, "padding", jnp.bfloat16, 32, 32),
    "f32_head128_default_blocks": (1, 200, 200, 4, 2, 128, True, None, "documents", jnp.float32, None, None),
    "long_documents_window": (2, 384, 384, 4, 2, 64, True, 40, "documents", jnp.bfloat16, 32, 32),
    "long_noncausal_window": (1, 300, 300, 4, 4, 64, False, 33, "padding", jnp.float32, 32, 64),
}
TOL = {jnp.float32: 5e-6, jnp.bfloat16: 1.5e-2}  # max error relative to the largest reference value
STREAMING_IDS = dict(argnames="streaming", argvalues=[False, True], ids=["resident", "streaming"])


def make_inputs(name, b, t, s, h, g, d, layout, dtype):
  rng = np.random.default_rng(zlib.crc32(name.encode()))  # fresh inputs per case, reproducible
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, s, g, d)).astype(np.float32)
  v = rng.normal(size=(b, s, g, d)).astype(np.float32)
  w = rng.normal(size=(b, t, h, d)).astype(np.float32)
  q_pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  kv_pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int32)
  q_seg = kv_seg = None
  if layout == "documents":  # packed documents, positions restart per document
    assert t == s
    seg = np.sort(rng.integers(1, 5, size=(b, t)), axis=1).astype(np.int32)
    seg[:, -3:] = 0  # and a little padding at the end
    q_seg = kv_seg = seg
    q_pos = kv_pos = np.asarray(segment_positions(jnp.asarray(seg)))
  elif layout == "padding":  # valid prefix per row, then segment 0 (keys and queries)
    lengths = rng.integers(1, t, size=b)
    q_seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    kv_seg = q_seg.copy()
  elif layout == "patches":  # patch-local cross attention: query i attends to the bytes of patch i
    kv_seg = np.sort(rng.integers(1, t + 1, size=(b, s)), axis=1).astype(np.int32)
    q_seg = np.broadcast_to(np.arange(1, t + 1), (b, t)).astype(np.int32)  # some patches have no bytes
  # Round through the kernel dtype so the float64 reference sees exactly the kernel's inputs.
  cast = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  return cast(q), cast(k), cast(v), w, q_pos, kv_pos, q_seg, kv_seg


def run_case(name, spec, streaming=None):
  b, t, s, h, g, d, causal, window, layout, dtype, bq, bk = spec
  q, k, v, w, q_pos, kv_pos, q_seg, kv_seg = make_inputs(name, b, t, s, h, g, d, layout, dtype)
  scale = d**-0.5
  ones_t, ones_s = np.ones((b, t), np.int32), np.ones((b, s), np.int32)
  mask = np_mask(q_pos, kv_pos, ones_t if q_seg is None else q_seg, ones_s if kv_seg is None else kv_seg,
                 causal, window)
  ref = np_attention_and_grads(q, k, v, w, mask, scale)

  attention_mask = AttentionMask(
      jnp.asarray(q_pos), jnp.asarray(kv_pos), None if q_seg is None else jnp.asarray(q_seg),
      None if kv_seg is None else jnp.asarray(kv_seg), causal=causal, window=window,
  )
  kwargs = dict(block_q=bq, block_k=bk, streaming=streaming)
  qj, kj, vj = (jnp.asarray(x, dtype) for x in (q, k, v))
  wj = jnp.asarray(w)

  def loss(q_, k_, v_):
    out = fa.flash_attention(q_, k_, v_, attention_mask, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * wj), out

  with fa.poison_outputs():  # jitted: forward and backward compile as one program (eagerly: each kernel on its own)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(qj, kj, vj)

  for what, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
    got = np.asarray(got, np.float64)
    assert got.dtype == np.float64 and not np.isnan(got).any(), f"{name}: NaN in {what} (unwritten block?)"
    err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
    assert err < TOL[dtype], f"{name}: {what} error {err:.2e} > {TOL[dtype]:.0e}"
  assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
  # Rows with no visible key: exactly zero output and zero dq.
  empty_BxT = ~mask.any(-1)
  if empty_BxT.any():
    assert np.all(np.asarray(out, np.float64)[empty_BxT] == 0.0), name
    assert np.all(np.asarray(grads[0], np.float64)[empty_BxT] == 0.0), name


SLOW = {"long_documents_window", "long_noncausal_window"}  # bigger grids: the slowest in interpret mode
# The streaming variant by default on one case per mask kind (GQA, MQA and bf16 among them); the rest are slow.
STREAMING_FAST = {
    "causal", "noncausal_cross_T_ne_S", "window_causal", "window_noncausal", "documents_window", "padding",
    "patch_cross_attention", "mqa_g1_head64", "bf16_documents_window_head128",
}


def _params(fast):
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in CASES]


@pytest.mark.parametrize("name", _params(set(CASES) - SLOW))
def test_flash_attention_matches_float64(name):
  run_case(name, CASES[name], streaming=False)


@pytest.mark.parametrize("name", _params(STREAMING_FAST))
def test_streaming_flash_attention_matches_float64(name):
  run_case(name, CASES[name], streaming=True)


@pytest.mark.parametrize(**STREAMING_IDS)
def test_fully_masked_rows_are_zero_not_nan(streaming):
  b, t, h, d = 1, 24, 2, 32
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  q_seg = jnp.asarray([[1] * 8 + [2] * 8 + [0] * 8])  # segment 2 has no keys; the last 8 are padding
  kv_seg = jnp.asarray([[1] * 8 + [3] * 8 + [1] * 8])
  mask = AttentionMask(pos, pos, q_seg, kv_seg, causal=False)
  kw = dict(block_q=8, block_k=8, streaming=streaming)
  grad_fn = jax.grad(lambda *a: jnp.sum(fa.flash_attention(*a, mask, **kw) ** 2), argnums=(0, 1, 2))
  with fa.poison_outputs():  # jitted: one compile (eagerly: each kernel on its own)
    out, grads = jax.jit(lambda *a: (fa.flash_attention(*a, mask, **kw), grad_fn(*a)))(q, k, v)
  out = np.asarray(out)
  assert np.all(out[0, 8:] == 0.0) and np.all(np.abs(out[0, :8]).sum(-1) > 0)
  for grad in grads:
    assert np.isfinite(np.asarray(grad)).all()
  assert np.all(np.asarray(grads[0])[0, 8:] == 0.0)
  assert np.all(np.asarray(grads[1])[0, 8:16] == 0.0)  # keys of segment 3: nobody attends to them


def test_under_jit_and_default_blocks():
  b, t, h, d = 1, 29, 2, 32
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  f = jax.jit(lambda q, k, v, p: fa.flash_attention(q, k, v, AttentionMask.self_attention(p, window=5)))
  out = f(q, k, v, pos)
  mask = np_mask(np.asarray(pos), np.asarray(pos), np.ones((b, t)), np.ones((b, t)), True, 5)
  want = np_attention_and_grads(q, k, v, np.zeros((b, t, h, d)), mask, d**-0.5)[0]
  assert np.max(np.abs(np.asarray(out) - want)) < 2e-5


def _dense_block_table(mask_BxTxS, bq, bk):
  b, t, s = mask_BxTxS.shape
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  padded = np.zeros((b, tp, sp), bool)
  padded[:, :t, :s] = mask_BxTxS
  return padded.reshape(b, tp // bq, bq, sp // bk, bk).any(axis=(2, 4))


def _visits(t, h, d, pos, seg, causal, window, bq, bk, streaming):
  q = jnp.zeros((1, t, h, d), jnp.float32)
  k = jnp.zeros((1, t, 1, d), jnp.float32)
  seg_j = None if seg is None else jnp.asarray(seg)
  mask = AttentionMask.self_attention(jnp.asarray(pos), seg_j, causal=causal, window=window)
  table, visits = fa.block_visits(q, k, k, mask, block_q=bq, block_k=bk, streaming=streaming)
  return np.asarray(table), np.asarray(visits)


@pytest.mark.parametrize(**STREAMING_IDS)
def test_block_skipping_is_banded_for_causal_window(streaming):
  t, bq, bk, window = 128, 16, 16, 20
  pos = np.arange(t)[None].astype(np.int32)
  table, visits = _visits(t, 2, 16, pos, None, True, window, bq, bk, streaming)
  dense = _dense_block_table(np.asarray(AttentionMask.self_attention(jnp.asarray(pos), window=window).dense()), bq, bk)
  np.testing.assert_array_equal(table, dense)  # exact for arange positions: every computed block is needed
  # What the kernel ran: exactly the table's blocks, for every head.
  np.testing.assert_array_equal(visits, np.broadcast_to(table.sum(-1)[:, None], visits.shape))
  n = t // bq
  i, j = np.nonzero(table[0])
  assert np.all(j <= i) and np.all(i - j <= -(-(window - 1) // bk))  # the band: at most 3 kv blocks per row
  assert table.sum() < n * (n + 1) // 2  # strictly fewer than plain causal


@pytest.mark.parametrize(**STREAMING_IDS)
def test_block_skipping_documents_is_conservative_and_skips(streaming):
  t, bq, bk = 96, 16, 16
  seg = np.repeat(np.arange(1, 5), 24)[None].astype(np.int32)  # 4 documents, not block aligned
  pos = np.asarray(segment_positions(jnp.asarray(seg)))
  table, visits = _visits(t, 1, 16, pos, seg, True, None, bq, bk, streaming)
  dense = _dense_block_table(
      np.asarray(AttentionMask.self_attention(jnp.asarray(pos), jnp.asarray(seg)).dense()), bq, bk
  )
  assert np.all(table >= dense)  # never skips a needed block
  assert table.sum() < np.tril(np.ones((t // bq, t // bk))).sum()  # and skips across documents
  np.testing.assert_array_equal(visits[:, 0], table.sum(-1))


def test_streaming_is_refused_on_gpu():
  q = jnp.zeros((1, 8, 2, 32), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(8), (1, 8))
  with pytest.raises(ValueError, match="streaming=True"):
    fa.flash_attention(q, q, q, AttentionMask.self_attention(pos), backend="gpu", interpret=True, streaming=True)


def test_cudnn_raises_clearly_on_cpu():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(8), (1, 8))
  with pytest.raises(NotImplementedError, match="NVIDIA GPU"):
    cudnn_attention.cudnn_attention(q, q, q, AttentionMask.self_attention(pos))


def test_cudnn_mask_plan_never_drops_a_mask():
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  padded = jnp.asarray([[1] * 5 + [0] * 3, [2] * 8])
  plan = cudnn_attention.cudnn_mask_plan(AttentionMask.self_attention(pos, padded))
  np.testing.assert_array_equal(plan["kv_len_B"], [5, 8])
  with pytest.raises(NotImplementedError, match="cannot express"):  # packed documents
    cudnn_attention.cudnn_mask_plan(AttentionMask(pos, pos, jnp.asarray([[1] * 4 + [2] * 4] * 2), None))
  with pytest.raises(NotImplementedError, match="cannot express"):  # positions are not indices
    cudnn_attention.cudnn_mask_plan(AttentionMask(pos, pos + jnp.asarray([[0], [1]])))
  with pytest.raises(NotImplementedError, match="two-sided"):
    cudnn_attention.cudnn_mask_plan(AttentionMask(pos, pos, causal=False, window=4))
  # Under jit the same check cannot raise: it flags the rows instead (the wrapper poisons them with NaN).
  ok = jax.jit(lambda p: cudnn_attention.cudnn_mask_plan(AttentionMask(p, p + 1))["ok_B"])(pos)
  assert not np.asarray(ok).any()


def _abstract_mesh(kind, platform):
  mesh_lib = pytest.importorskip("jax._src.mesh")
  if not hasattr(mesh_lib, "AbstractDevice"):
    pytest.skip("this jax has no AbstractDevice to target an absent accelerator")
  device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_for_accelerators(platform, monkeypatch):
  """Lowers forward+backward to Mosaic (TPU) / Triton IR (GPU) without the hardware (no compile, no run).

  Uses a private jax hook (``AbstractDevice``) to name the target device; skipped if it moves.
  """
  from jax import export

  monkeypatch.setattr(fa, "_backend", lambda: "tpu" if platform == "tpu" else "gpu")
  kind = ("TPU v5e", "tpu") if platform == "tpu" else ("NVIDIA H100 80GB HBM3", "gpu")
  q = jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
  p = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

  def f(q, k, v, pos, seg):
    attn = lambda q, k, v: fa.flash_attention(
        q, k, v, AttentionMask.self_attention(pos, seg, window=256), interpret=False
    )
    return jax.grad(lambda *a: attn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  with jax.sharding.use_abstract_mesh(_abstract_mesh(*kind)):
    exported = export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, k, k, p, p)
  assert "bytescale_flash_dkv" in exported.mlir_module()


def test_inside_shard_map_with_check_vma_false():
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Explicit,))
  q = jnp.asarray(np.random.default_rng(5).normal(size=(1, 20, 2, 16)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(20), (1, 20))
  f = lambda q, p: fa.flash_attention(q, q, q, AttentionMask.self_attention(p), block_q=8, block_k=8)
  want = np.asarray(f(q, pos))
  # Explicitly sharded arrays must go through shard_map: outside it the kernel refs would carry the sharding.
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("b")))
  q, pos = put(q), put(pos)
  sharded = jax.shard_map(f, mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b"), check_vma=False)
  np.testing.assert_array_equal(np.asarray(jax.jit(sharded)(q, pos)), want)
  grad = jax.jit(jax.grad(lambda q: sharded(q, pos).sum()))(q)
  assert np.isfinite(np.asarray(grad)).all()
