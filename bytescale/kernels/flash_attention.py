"""Flash attention in Pallas: online-softmax forward, Pallas dq and dk/dv backward, block skipping.

Semantics are exactly those of :func:`bytescale.ops.attention.attention_reference` (positions + segment ids;
segment 0 = invalid key; causal ``kv_pos <= q_pos``; window ``q_pos - kv_pos < window`` (causal) or
``|q_pos - kv_pos| < window``; rows with no visible key give zeros and zero gradients, never NaN; grouped KV
heads with ``H % G == 0``).

Structure (one kernel source for every backend):

* Inputs are transposed to ``BxHxTxK`` / ``BxGxSxK`` and padded to whole blocks; padded keys and queries get
  segment 0, so they are masked by the ordinary mask and need no special case.
* Per block of queries and per block of keys we summarise, in jnp before the ``pallas_call``, the min/max
  position and the min/max non-zero segment id (``BxNxnB`` int32, tiny). From these a conservative test
  ``_blocks_may_interact`` says whether a (q block, kv block) pair can contain a visible pair. The same test
  gives, per q block, the first and last kv block to visit (and per kv block the q-block range for dk/dv), so
  the kernel's loop only spans the band, and inside the band a ``lax.cond`` skips blocks that the test
  excludes (e.g. other documents). For positions = arange the test is exact for causal and windowed masks.
* Forward and dq kernels: grid ``(B, H, nQ)``; each program keeps one q block and loops over kv blocks of
  the whole K/V row of its KV group (``BxGxnKxbkxK``, indexed on the leading block axis). dk/dv kernel:
  grid ``(B, G, nK)``; each program keeps one kv block and loops over q blocks and over the ``R = H // G``
  query heads sharing it, so grouped heads need no repeat and no reduction afterwards.
* Backend differences live only in the specs: the small int tables go to SMEM on TPU (Mosaic), and
  compiler params (Triton ``num_warps``/``num_stages``; Mosaic dimension semantics) and default block sizes
  are picked per backend. ``interpret=None`` means interpret mode on CPU, compiled elsewhere. ``backend=``
  picks another backend's specs, so a CPU host can lower the kernels for TPU/GPU (see ``bytescale.kernels``).

Limits: positions must satisfy ``|pos| < 2**28`` (the block summaries use ``±2**29`` as empty sentinels).
The forward/dq kernels hold a whole K/V row per program, the dk/dv kernel the whole Q/dO row of its R query
heads: on TPU that must fit VMEM, double-buffered (``tests/test_kernel_lowering.py`` estimates it; a 2k-token
backward with R = 4, head dim 128, bf16 needs ~10 MiB of the 16 MiB default on v5e; longer rows need
grid-axis variants, not written). Inside ``shard_map``, ``pallas_call`` needs ``check_vma=False``
(``jax.shard_map(..., check_vma=False)``); arrays sharded over Explicit mesh axes must go through such a
``shard_map`` (called on them directly, the kernel refs would carry the sharding and fail to index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from bytescale.kernels import resolve_backend
from bytescale.ops.attention import _check_shapes

_BIG = 2**29  # sentinel for "no valid entry" in block summaries; differences stay inside int32
_NUM_STATS = 4  # pos_min, pos_max, seg_min, seg_max
# Info table rows: the 4 stats, then the [lo, hi) range of blocks of the other operand to visit.
_LO, _HI = 4, 5

# Per-backend defaults (block_q, block_k), by head dim. GPU/TPU figures are starting points, not tuned here.
_DEFAULT_BLOCKS = {
    "gpu": {64: (64, 64), 128: (64, 64), 256: (32, 32)},
    "tpu": {64: (256, 256), 128: (256, 256), 256: (128, 128)},
    "cpu": {64: (128, 128), 128: (128, 128), 256: (128, 128)},  # interpret: fewer, bigger steps are faster
}
_MIN_BLOCK = {"gpu": 16, "tpu": 128, "cpu": 8}


@dataclasses.dataclass
class _Debug:
  poison: bool = False


_DEBUG = _Debug()


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
  """Test aid: kernel outputs start as NaN (via ``input_output_aliases``), so unwritten blocks show."""
  old, _DEBUG.poison = _DEBUG.poison, enabled
  try:
    yield
  finally:
    _DEBUG.poison = old


@dataclasses.dataclass(frozen=True)
class _Config:
  block_q: int
  block_k: int
  causal: bool
  window: int | None
  scale: float
  backend: str
  interpret: bool
  poison: bool = False
  count_visits: bool = False


def _backend() -> str:
  return resolve_backend()  # the local backend


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _pick_block(requested: int | None, default: int, length: int, backend: str) -> int:
  if requested is not None:
    if requested <= 0 or requested % 8:
      raise ValueError(f"block sizes must be positive multiples of 8, got {requested}")
    if backend == "gpu" and requested & (requested - 1):
      raise ValueError(f"Triton needs power-of-two blocks, got {requested}")
    return requested
  # Short sequences: shrink the block to the (power-of-two-rounded) length, not below the backend minimum.
  return max(_MIN_BLOCK[backend], min(default, _next_pow2(length)))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ---------------------------------------------------------------------------------------------------------
# Block summaries and the block-skipping test (shared by the host side and the kernels).


def _block_stats(pos_BxN, seg_BxN, block: int):
  """``Bx4xnB`` int32: min/max position and min/max segment over the valid (segment != 0) entries."""
  b, n = pos_BxN.shape
  pos = pos_BxN.reshape(b, n // block, block)
  seg = seg_BxN.reshape(b, n // block, block)
  valid = seg != 0
  return jnp.stack(
      [
          jnp.min(jnp.where(valid, pos, _BIG), axis=-1),
          jnp.max(jnp.where(valid, pos, -_BIG), axis=-1),
          jnp.min(jnp.where(valid, seg, _BIG), axis=-1),
          jnp.max(jnp.where(valid, seg, -_BIG), axis=-1),
      ],
      axis=1,
  ).astype(jnp.int32)


def _blocks_may_interact(q_stats, kv_stats, causal: bool, window: int | None):
  """False only if no (query, key) pair of the two blocks can be visible. Works on scalars or arrays.

  Each condition is necessary; for contiguous positions (arange) and one segment they are also sufficient.
  An empty block (all segment 0) has ``min = +BIG > max = -BIG``, which fails the segment-overlap test.
  """
  q_pmin, q_pmax, q_smin, q_smax = q_stats
  k_pmin, k_pmax, k_smin, k_smax = kv_stats
  ok = (q_smin <= k_smax) & (k_smin <= q_smax)
  if causal:
    ok = ok & (k_pmin <= q_pmax)
  if window is not None:
    ok = ok & (q_pmin - k_pmax < window)  # the closest pair must be inside the window
    if not causal:
      ok = ok & (k_pmin - q_pmax < window)
  return ok


def _block_table(q_stats_Bx4xnQ, kv_stats_Bx4xnK, causal, window):
  """``BxnQxnK`` bool: which block pairs the kernels compute."""
  q = tuple(q_stats_Bx4xnQ[:, r, :, None] for r in range(_NUM_STATS))
  k = tuple(kv_stats_Bx4xnK[:, r, None, :] for r in range(_NUM_STATS))
  return _blocks_may_interact(q, k, causal, window)


def _visit_range(table_BxMxN):
  """Per row of the table, the ``[lo, hi)`` span of True columns (``lo == hi == 0`` if none)."""
  n = table_BxMxN.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  lo = jnp.min(jnp.where(table_BxMxN, idx, n), axis=-1)
  hi = jnp.max(jnp.where(table_BxMxN, idx + 1, 0), axis=-1)
  return jnp.minimum(lo, hi).astype(jnp.int32), hi.astype(jnp.int32)


def _mask(q_pos_Qx1, q_seg_Qx1, kv_pos_1xC, kv_seg_1xC, causal, window):
  # Elementwise and broadcasting only, so it also builds the transposed CxQ mask from 1xQ and Cx1 operands.
  mask = (q_seg_Qx1 == kv_seg_1xC) & (kv_seg_1xC != 0)
  if causal:
    mask = mask & (kv_pos_1xC <= q_pos_Qx1)
  if window is not None:
    distance = q_pos_Qx1 - kv_pos_1xC
    mask = mask & ((distance < window) if causal else (jnp.abs(distance) < window))
  return mask


# ---------------------------------------------------------------------------------------------------------
# Kernels. Shape suffixes inside kernels: Q = rows of the q block, C = columns of the kv block, D = head dim.


def _dot(a, b, contract_a: int, contract_b: int):
  # f32 inputs: ask for full precision (Triton would otherwise use TF32); bf16: native MXU/tensor-core path.
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def _read_stats(info_ref, i):
  return tuple(info_ref[r, i] for r in range(_NUM_STATS))


def _fwd_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, *rest, cfg
):
  o_ref, lse_ref, *count_ref = rest
  i = pl.program_id(2)
  q_stats = _read_stats(q_info_ref, i)
  lo, hi = q_info_ref[_LO, i], q_info_ref[_HI, i]
  q_QxD = q_ref[...]
  q_pos_Qx1, q_seg_Qx1 = q_pos_ref[...], q_seg_ref[...]
  bq, d = q_QxD.shape

  def visit(j, carry):
    acc_QxD, m_Qx1, l_Qx1, count = carry
    k_CxD, v_CxD = k_ref[j], v_ref[j]
    s_QxC = _dot(q_QxD, k_CxD, 1, 1) * cfg.scale
    mask = _mask(q_pos_Qx1, q_seg_Qx1, kv_pos_ref[j], kv_seg_ref[j], cfg.causal, cfg.window)
    s_QxC = jnp.where(mask, s_QxC, -jnp.inf)
    m_new = jnp.maximum(m_Qx1, jnp.max(s_QxC, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet: avoid inf - inf
    p_QxC = jnp.exp(s_QxC - m_safe)  # masked entries: exp(-inf) = 0
    alpha = jnp.exp(m_Qx1 - m_safe)
    l_new = alpha * l_Qx1 + jnp.sum(p_QxC, axis=1, keepdims=True)
    acc_new = alpha * acc_QxD + _dot(p_QxC.astype(v_CxD.dtype), v_CxD, 1, 0)
    return acc_new, m_new, l_new, count + 1

  def body(j, carry):
    visible = _blocks_may_interact(q_stats, _read_stats(kv_info_ref, j), cfg.causal, cfg.window)
    return lax.cond(visible, visit, lambda _, c: c, j, carry)

  init = (
      jnp.zeros((bq, d), jnp.float32),
      jnp.full((bq, 1), -jnp.inf, jnp.float32),
      jnp.zeros((bq, 1), jnp.float32),
      jnp.zeros((), jnp.int32),
  )
  acc_QxD, m_Qx1, l_Qx1, count = lax.fori_loop(lo, hi, body, init)
  empty = l_Qx1 == 0.0
  o_ref[...] = (acc_QxD / jnp.where(empty, 1.0, l_Qx1)).astype(o_ref.dtype)
  # Fully masked rows: lse = +inf makes every backward probability exp(s - lse) exactly 0.
  lse_ref[...] = jnp.where(empty, jnp.inf, m_Qx1 + jnp.log(jnp.where(empty, 1.0, l_Qx1)))
  if count_ref:
    count_ref[0][...] = jnp.full(count_ref[0].shape, count, jnp.int32)


def _probs(q_QxD, k_CxD, lse_Qx1, mask, scale):
  # Also used transposed: _probs(k_CxD, q_QxD, lse_1xQ, mask_CxQ, scale) gives the CxQ probabilities.
  s = _dot(q_QxD, k_CxD, 1, 1) * scale
  return jnp.where(mask, jnp.exp(s - lse_Qx1), 0.0)


def _dq_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
    do_ref, lse_ref, delta_ref, *rest, cfg,
):
  (dq_ref,) = rest
  i = pl.program_id(2)
  q_stats = _read_stats(q_info_ref, i)
  lo, hi = q_info_ref[_LO, i], q_info_ref[_HI, i]
  q_QxD, do_QxD = q_ref[...], do_ref[...]
  lse_Qx1, delta_Qx1 = lse_ref[...], delta_ref[...]
  q_pos_Qx1, q_seg_Qx1 = q_pos_ref[...], q_seg_ref[...]

  def visit(j, dq_QxD):
    k_CxD, v_CxD = k_ref[j], v_ref[j]
    mask = _mask(q_pos_Qx1, q_seg_Qx1, kv_pos_ref[j], kv_seg_ref[j], cfg.causal, cfg.window)
    p = _probs(q_QxD, k_CxD, lse_Qx1, mask, cfg.scale)
    dp = _dot(do_QxD, v_CxD, 1, 1)
    ds = p * (dp - delta_Qx1)
    return dq_QxD + _dot(ds.astype(k_CxD.dtype), k_CxD, 1, 0)

  def body(j, dq_QxD):
    visible = _blocks_may_interact(q_stats, _read_stats(kv_info_ref, j), cfg.causal, cfg.window)
    return lax.cond(visible, visit, lambda _, c: c, j, dq_QxD)

  dq_QxD = lax.fori_loop(lo, hi, body, jnp.zeros(q_QxD.shape, jnp.float32))
  dq_ref[...] = (dq_QxD * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
    do_ref, lse_ref, delta_ref, *rest, cfg, num_rep: int,
):
  # Computed transposed (kv rows x q columns): the per-query vectors of the whole row (positions, segments,
  # lse, delta) are then lane-dense 1xQ rows; as Qx1 columns TPU VMEM would pad each to 128 lanes (128x the
  # bytes), and the matmuls need no transposed operand.
  dk_ref, dv_ref = rest
  j = pl.program_id(2)
  kv_stats = _read_stats(kv_info_ref, j)
  lo, hi = kv_info_ref[_LO, j], kv_info_ref[_HI, j]
  k_CxD, v_CxD = k_ref[...], v_ref[...]
  kv_pos_Cx1, kv_seg_Cx1 = kv_pos_ref[...], kv_seg_ref[...]

  def visit(i, carry):
    dk_CxD, dv_CxD = carry
    mask_CxQ = _mask(q_pos_ref[i], q_seg_ref[i], kv_pos_Cx1, kv_seg_Cx1, cfg.causal, cfg.window)
    for r in range(num_rep):  # the query heads sharing this KV head: reuse the k/v block and the mask
      q_QxD, do_QxD = q_ref[r, i], do_ref[r, i]
      p_CxQ = _probs(k_CxD, q_QxD, lse_ref[r, i], mask_CxQ, cfg.scale)
      dv_CxD = dv_CxD + _dot(p_CxQ.astype(do_QxD.dtype), do_QxD, 1, 0)
      ds_CxQ = p_CxQ * (_dot(v_CxD, do_QxD, 1, 1) - delta_ref[r, i])
      dk_CxD = dk_CxD + _dot(ds_CxQ.astype(q_QxD.dtype), q_QxD, 1, 0)
    return dk_CxD, dv_CxD

  def body(i, carry):
    visible = _blocks_may_interact(_read_stats(q_info_ref, i), kv_stats, cfg.causal, cfg.window)
    return lax.cond(visible, visit, lambda _, c: c, i, carry)

  zeros = jnp.zeros(k_CxD.shape, jnp.float32)
  dk_CxD, dv_CxD = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk_CxD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_CxD.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# pallas_call plumbing.


def _table_spec(shape, index_map, backend):
  # Small int tables read as scalars: SMEM on TPU; plain global memory on GPU / in interpret mode.
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pl.BlockSpec(shape, index_map, memory_space=pltpu.SMEM)
  return pl.BlockSpec(shape, index_map)


def _compiler_params(cfg, head_dim):
  if cfg.interpret:
    return None
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  return None


def _poisoned(shape_dtypes):
  return [jnp.full(s.shape, jnp.nan, s.dtype) for s in shape_dtypes]


def _call(kernel, cfg, *, grid, in_specs, out_specs, out_shape, args, name, head_dim):
  aliases = {}
  if cfg.poison:
    # NaN-filled buffers aliased to the outputs: anything the kernel does not write stays NaN.
    n_in, n_out = len(args), len(out_shape)
    aliases = {n_in + n: n for n in range(n_out)}
    args = (*args, *_poisoned(out_shape))
    in_specs = [*in_specs, *out_specs]
    inner = kernel

    def kernel(*refs):  # the poison inputs are never read
      inner(*refs[:n_in], *refs[n_in + n_out :])

  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, head_dim),
      name=name,
  )(*args)


def _meta_specs(cfg, n_q, n_k, *, kv_major: bool):
  """Specs for (q_info, kv_info, q_pos, q_seg, kv_pos, kv_seg); grid axes are (b, head, block)."""
  bq, bk = cfg.block_q, cfg.block_k
  tables = [
      _table_spec((None, 6, n_q), lambda b, h, x: (b, 0, 0), cfg.backend),
      _table_spec((None, 6, n_k), lambda b, h, x: (b, 0, 0), cfg.backend),
  ]
  if kv_major:  # one kv block per program (a Cx1 column); all q blocks (1xQ rows) on the leading block axis
    q_meta = pl.BlockSpec((None, n_q, 1, bq), lambda b, g, j: (b, 0, 0, 0))
    kv_meta = pl.BlockSpec((None, bk, 1), lambda b, g, j: (b, j, 0))
  else:  # one q block per program; all kv blocks
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
    kv_meta = pl.BlockSpec((None, n_k, 1, bk), lambda b, h, i: (b, 0, 0, 0))
  return [*tables, q_meta, q_meta, kv_meta, kv_meta]


def _q_major_meta(q_pos, q_seg, kv_pos, kv_seg, n_k, bk):
  b = q_pos.shape[0]
  return q_pos[..., None], q_seg[..., None], kv_pos.reshape(b, n_k, 1, bk), kv_seg.reshape(b, n_k, 1, bk)


def _forward(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  b, h, t_pad, d = q.shape
  g, s_pad = k.shape[1], k.shape[2]
  bq, bk = cfg.block_q, cfg.block_k
  n_q, n_k, rep = t_pad // bq, s_pad // bk, h // g
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, n_k, bk, d), lambda b_, h_, i: (b_, h_ // rep, 0, 0, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t_pad, 1), jnp.float32)]
  out_specs = [q_spec, row_spec]
  if cfg.count_visits:  # one whole (8, 128) int32 tile per program: Mosaic rejects a (.., 1) block of (.., nQ)
    out_shape.append(jax.ShapeDtypeStruct((b, h, n_q, 8, 128), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, 8, 128), lambda b_, h_, i: (b_, h_, i, 0, 0)))
  args = (
      q_info, kv_info, *_q_major_meta(q_pos, q_seg, kv_pos, kv_seg, n_k, bk),
      q, k.reshape(b, g, n_k, bk, d), v.reshape(b, g, n_k, bk, d),
  )
  return _call(
      functools.partial(_fwd_kernel, cfg=cfg),
      cfg,
      grid=(b, h, n_q),
      in_specs=[*_meta_specs(cfg, n_q, n_k, kv_major=False), q_spec, kv_spec, kv_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      args=args,
      name="bytescale_flash_fwd",
      head_dim=d,
  )


def _backward(cfg, res, do):
  q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, o, lse = res
  b, h, t_pad, d = q.shape
  g, s_pad = k.shape[1], k.shape[2]
  bq, bk = cfg.block_q, cfg.block_k
  n_q, n_k, rep = t_pad // bq, s_pad // bk, h // g
  # delta_i = sum_d o_id * do_id: a cheap elementwise reduction, left to XLA.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)

  # dq: q-major, like the forward.
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, n_k, bk, d), lambda b_, h_, i: (b_, h_ // rep, 0, 0, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0))
  (dq,) = _call(
      functools.partial(_dq_kernel, cfg=cfg),
      cfg,
      grid=(b, h, n_q),
      in_specs=[
          *_meta_specs(cfg, n_q, n_k, kv_major=False),
          q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
      ],
      out_specs=[q_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
      args=(
          q_info, kv_info, *_q_major_meta(q_pos, q_seg, kv_pos, kv_seg, n_k, bk),
          q, k.reshape(b, g, n_k, bk, d), v.reshape(b, g, n_k, bk, d), do, lse, delta,
      ),
      name="bytescale_flash_dq",
      head_dim=d,
  )

  # dk/dv: kv-major; the R query heads of group g are heads g*R .. g*R+R-1, i.e. block g of size R.
  # Per-query vectors as 1xQ rows (lse/delta: BxHxnQx1xbq), per-key ones as Cx1 columns (see _dkv_kernel).
  kv_blk = pl.BlockSpec((None, None, bk, d), lambda b_, g_, j: (b_, g_, j, 0))
  qh_spec = pl.BlockSpec((None, rep, n_q, bq, d), lambda b_, g_, j: (b_, g_, 0, 0, 0))
  rowh_spec = pl.BlockSpec((None, rep, n_q, 1, bq), lambda b_, g_, j: (b_, g_, 0, 0, 0))
  dk, dv = _call(
      functools.partial(_dkv_kernel, cfg=cfg, num_rep=rep),
      cfg,
      grid=(b, g, n_k),
      in_specs=[
          *_meta_specs(cfg, n_q, n_k, kv_major=True),
          qh_spec, kv_blk, kv_blk, qh_spec, rowh_spec, rowh_spec,
      ],
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      args=(
          q_info, kv_info,
          q_pos.reshape(b, n_q, 1, bq), q_seg.reshape(b, n_q, 1, bq), kv_pos[..., None], kv_seg[..., None],
          q.reshape(b, h, n_q, bq, d), k, v, do.reshape(b, h, n_q, bq, d),
          lse.reshape(b, h, n_q, 1, bq), delta.reshape(b, h, n_q, 1, bq),
      ),
      name="bytescale_flash_dkv",
      head_dim=d,
  )
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  return _forward(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info)[0]


def _flash_core_fwd(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  o, lse = _forward(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info)[:2]
  return o, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, o, lse)


def _flash_core_bwd(cfg, res, do):
  dq, dk, dv = _backward(cfg, res, do)
  return dq, dk, dv, None, None, None, None, None, None  # integer metadata: no cotangent


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# ---------------------------------------------------------------------------------------------------------
# Public API.


def _resolve_config(
    q_shape, s, *, causal, window, scale, block_q, block_k, interpret, backend=None, count_visits=False
):
  backend = _backend() if backend is None else resolve_backend(backend)
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and backend == "cpu":
    raise ValueError("Pallas kernels run on CPU only in interpret mode (interpret=True or None)")
  t, d = q_shape[1], q_shape[3]
  if window is not None and window > _BIG:
    window = _BIG  # wider than any representable distance: same mask, and no int32 overflow in the test
  default_q, default_k = _DEFAULT_BLOCKS[backend].get(d, _DEFAULT_BLOCKS[backend][128])
  bq = _pick_block(block_q, default_q, t, backend)
  bk = _pick_block(block_k, default_k, s, backend)
  return _Config(
      block_q=bq,
      block_k=bk,
      causal=bool(causal),
      window=None if window is None else int(window),
      scale=float(d**-0.5 if scale is None else scale),
      backend=backend,
      interpret=bool(interpret),
      poison=_DEBUG.poison,
      count_visits=count_visits,
  )


def _prepare(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  """Transpose to head-major, pad to whole blocks (padding = segment 0), build the block tables."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  t_pad, s_pad = _round_up(t, cfg.block_q), _round_up(s, cfg.block_k)
  q_seg = jnp.ones((b, t), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
  kv_seg = jnp.ones((b, s), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
  pad_t, pad_s = ((0, 0), (0, t_pad - t)), ((0, 0), (0, s_pad - s))
  q_pos = jnp.pad(q_pos.astype(jnp.int32), pad_t)
  q_seg = jnp.pad(q_seg, pad_t)
  kv_pos = jnp.pad(kv_pos.astype(jnp.int32), pad_s)
  kv_seg = jnp.pad(kv_seg, pad_s)
  q_stats = _block_stats(q_pos, q_seg, cfg.block_q)
  kv_stats = _block_stats(kv_pos, kv_seg, cfg.block_k)
  table = _block_table(q_stats, kv_stats, cfg.causal, cfg.window)
  q_lo, q_hi = _visit_range(table)  # per q block: kv blocks to visit
  kv_lo, kv_hi = _visit_range(jnp.swapaxes(table, 1, 2))  # per kv block: q blocks to visit
  q_info = jnp.concatenate([q_stats, q_lo[:, None], q_hi[:, None]], axis=1)
  kv_info = jnp.concatenate([kv_stats, kv_lo[:, None], kv_hi[:, None]], axis=1)
  head_major = lambda x, n, n_pad: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, n_pad - n), (0, 0)))
  qh, kh, vh = head_major(q, t, t_pad), head_major(k, s, s_pad), head_major(v, s, s_pad)
  return (qh, kh, vh, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info), table


def flash_attention(
    q_BxTxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    *,
    q_positions_BxT,
    kv_positions_BxS,
    q_segment_ids_BxT=None,
    kv_segment_ids_BxS=None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
):
  """Fused attention with the semantics of ``attention_reference``; differentiable (Pallas backward).

  float32 or bfloat16 inputs (softmax and accumulation in float32). ``block_q``/``block_k`` override the
  per-backend defaults (powers of two on GPU; multiples of 8). Sequence lengths need not be multiples of the
  blocks. Works under ``jax.jit``; inside ``shard_map`` use ``check_vma=False``. ``backend`` (``"cpu"``,
  ``"gpu"``/``"cuda"``/``"rocm"``, ``"tpu"``; None = local) selects the specs, compiler params and default
  blocks. A non-local one is for lowering (``jax.jit(...).trace(...).lower(lowering_platforms=...)``) or for
  running that backend's configuration in interpret mode (``interpret=True``).
  """
  _check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK)
  cfg = _resolve_config(
      q_BxTxHxK.shape, k_BxSxGxK.shape[1], causal=causal, window=window, scale=scale,
      block_q=block_q, block_k=block_k, interpret=interpret, backend=backend,
  )
  return _flash_jit(
      cfg, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT,
      kv_segment_ids_BxS,
  )


@functools.partial(jax.jit, static_argnums=(0,))
def _flash_jit(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  t = q.shape[1]
  args, _ = _prepare(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  o_BxHxTxK = _flash_core(cfg, *args)
  return jnp.swapaxes(o_BxHxTxK[:, :, :t], 1, 2)


def block_visits(
    q_BxTxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    *,
    q_positions_BxT,
    kv_positions_BxS,
    q_segment_ids_BxT=None,
    kv_segment_ids_BxS=None,
    causal: bool = True,
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
):
  """Introspection for tests/benchmarks: ``(table BxnQxnK bool, visits BxHxnQ int32)``.

  ``table`` is the block-pair table the kernels compute from; ``visits`` is what the forward kernel actually
  counted (kv blocks whose body ran) for each (batch, head, q block).
  """
  _check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK)
  cfg = _resolve_config(
      q_BxTxHxK.shape, k_BxSxGxK.shape[1], causal=causal, window=window, scale=None,
      block_q=block_q, block_k=block_k, interpret=interpret, backend=backend, count_visits=True,
  )
  args, table = _prepare(
      cfg, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT,
      kv_segment_ids_BxS,
  )
  visits = _forward(cfg, *args)[2][..., 0, 0]
  return table, visits


def default_block_sizes(head_dim: int, backend: str | None = None) -> tuple[int, int]:
  """The (block_q, block_k) used when none are given (before shrinking to short sequences)."""
  backend = _backend() if backend is None else resolve_backend(backend)
  return _DEFAULT_BLOCKS[backend].get(head_dim, _DEFAULT_BLOCKS[backend][128])


__all__ = ["flash_attention", "block_visits", "default_block_sizes", "poison_outputs"]
