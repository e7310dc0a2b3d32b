"""Flash attention in Pallas: online-softmax forward, Pallas dq and dk/dv backward, block skipping.

Called as ``flash_attention(q, k, v, mask)`` with an :class:`bytescale.ops.mask.AttentionMask`. Semantics are
exactly those of :func:`bytescale.ops.attention.attention_reference` (positions + segment ids;
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
  the kernels only work on the band, and inside the band skip the blocks that the test excludes (e.g. other
  documents): ``lax.cond`` in the resident kernels' loops, ``pl.when`` in the streaming kernels' steps. For
  positions = arange the test is exact for causal and windowed masks.
* Two kernel variants, the same per-block math (``_softmax_step``, ``_dq_step``, ``_dkv_step``):

  - *Resident* (GPU default; CPU interpret default, where it runs fastest): forward and dq grid
    ``(B, H, nQ)``, each program keeps one q block and loops over kv blocks of the whole K/V row of its KV
    group (``BxGxnKxbkxK``, indexed on the leading block axis); dk/dv grid ``(B, G, nK)``, each program keeps
    one kv block and loops over q blocks and over the ``R = H // G`` query heads sharing it, so grouped
    heads need no repeat and no reduction afterwards. No scratch memory (Triton has none).
  - *Streaming* (TPU default): the blocks of the other operand become the innermost sequential grid axis:
    forward/dq ``(B, H, nQ, nK)``, dk/dv ``(B, G, nK, R, nQ)``. The running state (online-softmax max/sum/
    output, or the dq / dk, dv sums) lives in VMEM scratch, set up on the first step and written out on the
    last, so VMEM use does not grow with the sequence. The block tables are scalar-prefetched into SMEM and
    the index maps clamp the streamed block into the visit band, so a skipped step asks for the block
    already fetched: it costs a grid step (all ``nK`` steps run) but no DMA. ``streaming=`` overrides.
* Backend differences live only in the specs: the small int tables go to SMEM on TPU (Mosaic), and
  compiler params (Triton ``num_warps``/``num_stages``; Mosaic dimension semantics) and default block sizes
  are picked per backend. ``interpret=None`` means interpret mode on CPU, compiled elsewhere. ``backend=``
  picks another backend's specs, so a CPU host can lower the kernels for TPU/GPU (see ``bytescale.kernels``).

Limits: positions must satisfy ``|pos| < 2**28`` (the block summaries use ``±2**29`` as empty sentinels).
The resident kernels hold a whole K/V row per program (dk/dv: the whole Q/dO row of its R query heads), which
on TPU must fit VMEM, double-buffered: a 2k-token GQA backward (R = 4, head dim 128, bf16) needs ~10 MiB of
the 16 MiB default on v5e, 32k tokens ~37 MiB (forward) to ~150 MiB (dk/dv); the streaming kernels need
under 2 MiB at any length (estimates: ``tests/test_kernel_lowering.py``). The streaming kernels still fetch
the skipped blocks *inside* the band (other documents). Both variants are lowered for TPU here, never compiled
or run on one: Mosaic's layout passes (e.g. for the Qx1 scratch columns) and the speed are unchecked.
Inside ``shard_map``, ``pallas_call`` needs ``check_vma=False`` (``jax.shard_map(..., check_vma=False)``);
arrays sharded over Explicit mesh axes must go through such a ``shard_map`` (called on them directly, the
kernel refs would carry the sharding and fail to index).
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
from bytescale.kernels.common import compiler_params, next_pow2, resolve_interpret, round_up, table_spec
from bytescale.ops.mask import AttentionMask, check_shapes

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
# Kernel variant per backend when ``streaming=None`` (see the module docstring). Triton has no scratch memory.
_DEFAULT_STREAMING = {"gpu": False, "tpu": True, "cpu": False}


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
  streaming: bool
  poison: bool = False
  count_visits: bool = False


def _backend() -> str:
  return resolve_backend()  # the local backend


def _pick_block(requested: int | None, default: int, length: int, backend: str) -> int:
  if requested is not None:
    if requested <= 0 or requested % 8:
      raise ValueError(f"block sizes must be positive multiples of 8, got {requested}")
    if backend == "gpu" and requested & (requested - 1):
      raise ValueError(f"Triton needs power-of-two blocks, got {requested}")
    return requested
  # Short sequences: shrink the block to the (power-of-two-rounded) length, not below the backend minimum.
  return max(_MIN_BLOCK[backend], min(default, next_pow2(length)))


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
# Per-block math, shared by both kernel variants. Shape suffixes inside kernels: Q = rows of the q block,
# C = columns of the kv block, D = head dim.


def _dot(a, b, contract_a: int, contract_b: int):
  # f32 inputs: ask for full precision (Triton would otherwise use TF32); bf16: native MXU/tensor-core path.
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def _read_stats(info_ref, i, b=None):
  # Resident kernels get their batch row's table (6xn); streaming kernels the whole prefetched Bx6xn table.
  lead = () if b is None else (b,)
  return tuple(info_ref[(*lead, r, i)] for r in range(_NUM_STATS))


def _softmax_step(q_QxD, k_CxD, v_CxD, mask_QxC, acc_QxD, m_Qx1, l_Qx1, scale):
  """One kv block of the online softmax: the running (output sum, row max, row sum) after also seeing it."""
  s_QxC = jnp.where(mask_QxC, _dot(q_QxD, k_CxD, 1, 1) * scale, -jnp.inf)
  m_new = jnp.maximum(m_Qx1, jnp.max(s_QxC, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet: avoid inf - inf
  p_QxC = jnp.exp(s_QxC - m_safe)  # masked entries: exp(-inf) = 0
  alpha = jnp.exp(m_Qx1 - m_safe)
  l_new = alpha * l_Qx1 + jnp.sum(p_QxC, axis=1, keepdims=True)
  acc_new = alpha * acc_QxD + _dot(p_QxC.astype(v_CxD.dtype), v_CxD, 1, 0)
  return acc_new, m_new, l_new


def _softmax_finish(acc_QxD, m_Qx1, l_Qx1):
  """``(output, lse)``; fully masked rows get output 0 and lse = +inf (every backward probability is then 0)."""
  empty = l_Qx1 == 0.0
  o_QxD = acc_QxD / jnp.where(empty, 1.0, l_Qx1)
  lse_Qx1 = jnp.where(empty, jnp.inf, m_Qx1 + jnp.log(jnp.where(empty, 1.0, l_Qx1)))
  return o_QxD, lse_Qx1


def _probs(q_QxD, k_CxD, lse_Qx1, mask, scale):
  # Also used transposed: _probs(k_CxD, q_QxD, lse_1xQ, mask_CxQ, scale) gives the CxQ probabilities.
  s = _dot(q_QxD, k_CxD, 1, 1) * scale
  return jnp.where(mask, jnp.exp(s - lse_Qx1), 0.0)


def _dq_step(q_QxD, k_CxD, v_CxD, do_QxD, lse_Qx1, delta_Qx1, mask_QxC, scale):
  """One kv block's contribution to dq (before the final ``* scale``)."""
  p_QxC = _probs(q_QxD, k_CxD, lse_Qx1, mask_QxC, scale)
  ds_QxC = p_QxC * (_dot(do_QxD, v_CxD, 1, 1) - delta_Qx1)
  return _dot(ds_QxC.astype(k_CxD.dtype), k_CxD, 1, 0)


def _dkv_step(k_CxD, v_CxD, q_QxD, do_QxD, lse_1xQ, delta_1xQ, mask_CxQ, scale):
  """One q block's contribution to (dk before ``* scale``, dv), computed transposed (kv rows x q columns).

  Transposed, the per-query vectors (lse, delta, positions, segments) are lane-dense 1xQ rows (as Qx1 columns
  TPU VMEM pads each to 128 lanes), and the matmuls need no transposed operand.
  """
  p_CxQ = _probs(k_CxD, q_QxD, lse_1xQ, mask_CxQ, scale)
  dv_CxD = _dot(p_CxQ.astype(do_QxD.dtype), do_QxD, 1, 0)
  ds_CxQ = p_CxQ * (_dot(v_CxD, do_QxD, 1, 1) - delta_1xQ)
  return _dot(ds_CxQ.astype(q_QxD.dtype), q_QxD, 1, 0), dv_CxD


# ---------------------------------------------------------------------------------------------------------
# Resident kernels (GPU; CPU interpret): one program per q block (kv block for dk/dv) holds the whole row of
# the other operand and loops over its visit band. Grids (B, H, nQ) and (B, G, nK); no scratch memory.


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
    *state, count = carry
    mask_QxC = _mask(q_pos_Qx1, q_seg_Qx1, kv_pos_ref[j], kv_seg_ref[j], cfg.causal, cfg.window)
    return *_softmax_step(q_QxD, k_ref[j], v_ref[j], mask_QxC, *state, cfg.scale), count + 1

  def body(j, carry):
    visible = _blocks_may_interact(q_stats, _read_stats(kv_info_ref, j), cfg.causal, cfg.window)
    return lax.cond(visible, visit, lambda _, c: c, j, carry)

  init = (
      jnp.zeros((bq, d), jnp.float32),
      jnp.full((bq, 1), -jnp.inf, jnp.float32),
      jnp.zeros((bq, 1), jnp.float32),
      jnp.zeros((), jnp.int32),
  )
  *state, count = lax.fori_loop(lo, hi, body, init)
  o_QxD, lse_Qx1 = _softmax_finish(*state)
  o_ref[...], lse_ref[...] = o_QxD.astype(o_ref.dtype), lse_Qx1
  if count_ref:
    count_ref[0][...] = jnp.full(count_ref[0].shape, count, jnp.int32)


def _dq_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
    do_ref, lse_ref, delta_ref, dq_ref, *, cfg,
):
  i = pl.program_id(2)
  q_stats = _read_stats(q_info_ref, i)
  lo, hi = q_info_ref[_LO, i], q_info_ref[_HI, i]
  q_QxD, do_QxD = q_ref[...], do_ref[...]
  lse_Qx1, delta_Qx1 = lse_ref[...], delta_ref[...]
  q_pos_Qx1, q_seg_Qx1 = q_pos_ref[...], q_seg_ref[...]

  def visit(j, dq_QxD):
    mask_QxC = _mask(q_pos_Qx1, q_seg_Qx1, kv_pos_ref[j], kv_seg_ref[j], cfg.causal, cfg.window)
    return dq_QxD + _dq_step(q_QxD, k_ref[j], v_ref[j], do_QxD, lse_Qx1, delta_Qx1, mask_QxC, cfg.scale)

  def body(j, dq_QxD):
    visible = _blocks_may_interact(q_stats, _read_stats(kv_info_ref, j), cfg.causal, cfg.window)
    return lax.cond(visible, visit, lambda _, c: c, j, dq_QxD)

  dq_QxD = lax.fori_loop(lo, hi, body, jnp.zeros(q_QxD.shape, jnp.float32))
  dq_ref[...] = (dq_QxD * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg, num_rep: int,
):
  # Loops over q blocks and over the R = H // G query heads sharing this kv head (their q/dO/lse/delta rows
  # are blocked as RxnQx..), so grouped heads need no repeat and no reduction afterwards.
  j = pl.program_id(2)
  kv_stats = _read_stats(kv_info_ref, j)
  lo, hi = kv_info_ref[_LO, j], kv_info_ref[_HI, j]
  k_CxD, v_CxD = k_ref[...], v_ref[...]
  kv_pos_Cx1, kv_seg_Cx1 = kv_pos_ref[...], kv_seg_ref[...]

  def visit(i, carry):
    dk_CxD, dv_CxD = carry
    mask_CxQ = _mask(q_pos_ref[i], q_seg_ref[i], kv_pos_Cx1, kv_seg_Cx1, cfg.causal, cfg.window)
    for r in range(num_rep):  # reuse the k/v block and the mask for every query head of the group
      dk_step, dv_step = _dkv_step(
          k_CxD, v_CxD, q_ref[r, i], do_ref[r, i], lse_ref[r, i], delta_ref[r, i], mask_CxQ, cfg.scale
      )
      dk_CxD, dv_CxD = dk_CxD + dk_step, dv_CxD + dv_step
    return dk_CxD, dv_CxD

  def body(i, carry):
    visible = _blocks_may_interact(_read_stats(q_info_ref, i), kv_stats, cfg.causal, cfg.window)
    return lax.cond(visible, visit, lambda _, c: c, i, carry)

  zeros = jnp.zeros(k_CxD.shape, jnp.float32)
  dk_CxD, dv_CxD = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk_CxD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_CxD.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# Streaming kernels (TPU): the blocks of the other operand are the innermost ("arbitrary") grid axis, one
# block pair per step; the running state lives in VMEM scratch, set up on the first step and written out on
# the last. The block tables are scalar-prefetched (whole, to SMEM), so the index maps can clamp the streamed
# block into the visit band: steps outside it ask for the block already fetched, so skipped blocks cost a
# grid step but no DMA. Grids (B, H, nQ, nK) and (B, G, nK, R, nQ).


def _stream_visible(q_info_ref, kv_info_ref, b, i, j, cfg):
  # The band [lo, hi) is the span of this test's True entries, so every visited block lies inside it and its
  # clamped index map fetched exactly block j (i for dk/dv).
  return _blocks_may_interact(_read_stats(q_info_ref, i, b), _read_stats(kv_info_ref, j, b), cfg.causal, cfg.window)


def _fwd_stream_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, *rest, cfg
):
  o_ref, lse_ref, *count_ref, acc_ref, m_ref, l_ref = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    if count_ref:
      count_ref[0][...] = jnp.zeros(count_ref[0].shape, jnp.int32)

  @pl.when(_stream_visible(q_info_ref, kv_info_ref, b, i, j, cfg))
  def _visit():
    mask_QxC = _mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...], cfg.causal, cfg.window)
    acc_ref[...], m_ref[...], l_ref[...] = _softmax_step(
        q_ref[...], k_ref[...], v_ref[...], mask_QxC, acc_ref[...], m_ref[...], l_ref[...], cfg.scale
    )
    if count_ref:  # the (8, 128) tile stays resident across the kv axis: a plain accumulator
      count_ref[0][...] += 1

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o_QxD, lse_Qx1 = _softmax_finish(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...], lse_ref[...] = o_QxD.astype(o_ref.dtype), lse_Qx1


def _dq_stream_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
    do_ref, lse_ref, delta_ref, dq_ref, dq_acc_ref, *, cfg,
):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  @pl.when(_stream_visible(q_info_ref, kv_info_ref, b, i, j, cfg))
  def _visit():
    mask_QxC = _mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...], cfg.causal, cfg.window)
    dq_acc_ref[...] += _dq_step(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask_QxC, cfg.scale
    )

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_stream_kernel(
    q_info_ref, kv_info_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, cfg,
):
  # Streams the q blocks (innermost) of each of the R query heads sharing this kv head (next axis out).
  b, j, r, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  @pl.when(_stream_visible(q_info_ref, kv_info_ref, b, i, j, cfg))
  def _visit():
    mask_CxQ = _mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...], cfg.causal, cfg.window)
    dk_CxD, dv_CxD = _dkv_step(
        k_ref[...], v_ref[...], q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask_CxQ, cfg.scale
    )
    dk_acc_ref[...] += dk_CxD
    dv_acc_ref[...] += dv_CxD

  @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# pallas_call plumbing.


def _poisoned(shape_dtypes):
  return [jnp.full(s.shape, jnp.nan, s.dtype) for s in shape_dtypes]


def _call(kernel, cfg, *, grid, in_specs, out_specs, out_shape, args, name, head_dim, prefetch=(), scratch=()):
  """``pallas_call``; with ``prefetch`` (scalar-prefetched tables, passed first) or ``scratch``, a streaming call.

  Resident calls: every grid axis parallel. Streaming calls: the last ``len(grid) - 3`` axes are sequential.
  """
  args = (*prefetch, *args)
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

  semantics = ("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
  if prefetch or scratch:
    from jax.experimental.pallas import tpu as pltpu

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
    )
  else:
    grid_spec = pl.GridSpec(grid=grid, in_specs=in_specs, out_specs=out_specs)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=cfg.interpret,
      compiler_params=compiler_params(
          cfg.backend, cfg.interpret, num_warps=4 if head_dim <= 64 else 8, dimension_semantics=semantics
      ),
      name=name,
  )(*args)


def _count_shape_and_spec(b, h, n_q, index_map):
  # One whole (8, 128) int32 tile per (b, h, q block): Mosaic rejects a (.., 1) block of (.., nQ).
  return jax.ShapeDtypeStruct((b, h, n_q, 8, 128), jnp.int32), pl.BlockSpec((None, None, None, 8, 128), index_map)


def _dims(cfg, q, k):
  """``(B, H, G, D, nQ, nK, R)`` of head-major padded q/k."""
  b, h, t_pad, d = q.shape
  g, s_pad = k.shape[1], k.shape[2]
  return b, h, g, d, t_pad // cfg.block_q, s_pad // cfg.block_k, h // g


def _forward(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  """``[o BxHxTxK, lse BxHxTx1 float32]`` (+ visit counts ``BxHxnQx8x128`` with ``cfg.count_visits``)."""
  run = _forward_streaming if cfg.streaming else _forward_resident
  return run(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info)


def _backward(cfg, res, do):
  q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, o, lse = res
  # delta_i = sum_d o_id * do_id: a cheap elementwise reduction, left to XLA.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  args = (cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, do, lse, delta)
  if cfg.streaming:
    return (_dq_streaming(*args), *_dkv_streaming(*args))
  return (_dq_resident(*args), *_dkv_resident(*args))


# Resident variant. Grid axes (b, head, block); the whole row of the other operand is one block.


def _resident_meta_specs(cfg, n_q, n_k, *, kv_major: bool):
  """Specs for (q_info, kv_info, q_pos, q_seg, kv_pos, kv_seg)."""
  bq, bk = cfg.block_q, cfg.block_k
  tables = [
      table_spec((None, 6, n_q), lambda b, h, x: (b, 0, 0), cfg.backend),
      table_spec((None, 6, n_k), lambda b, h, x: (b, 0, 0), cfg.backend),
  ]
  if kv_major:  # one kv block per program (a Cx1 column); all q blocks (1xQ rows) on the leading block axis
    q_meta = pl.BlockSpec((None, n_q, 1, bq), lambda b, g, j: (b, 0, 0, 0))
    kv_meta = pl.BlockSpec((None, bk, 1), lambda b, g, j: (b, j, 0))
  else:  # one q block per program; all kv blocks
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
    kv_meta = pl.BlockSpec((None, n_k, 1, bk), lambda b, h, i: (b, 0, 0, 0))
  return [*tables, q_meta, q_meta, kv_meta, kv_meta]


def _resident_q_major(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  """Shared by the forward and dq calls: ``(in_specs, args, q_spec, row_spec)`` for the meta, q, k and v."""
  b, _, g, d, n_q, n_k, rep = _dims(cfg, q, k)
  bq, bk = cfg.block_q, cfg.block_k
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, n_k, bk, d), lambda b_, h_, i: (b_, h_ // rep, 0, 0, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0))
  in_specs = [*_resident_meta_specs(cfg, n_q, n_k, kv_major=False), q_spec, kv_spec, kv_spec]
  by_block = lambda x: x.reshape(b, n_k, 1, bk)
  args = (
      q_info, kv_info, q_pos[..., None], q_seg[..., None], by_block(kv_pos), by_block(kv_seg),
      q, k.reshape(b, g, n_k, bk, d), v.reshape(b, g, n_k, bk, d),
  )
  return in_specs, args, q_spec, row_spec


def _forward_resident(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  b, h, _, d, n_q, _, _ = _dims(cfg, q, k)
  in_specs, args, q_spec, row_spec = _resident_q_major(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)]
  out_specs = [q_spec, row_spec]
  if cfg.count_visits:
    count_shape, count_spec = _count_shape_and_spec(b, h, n_q, lambda b_, h_, i: (b_, h_, i, 0, 0))
    out_shape.append(count_shape)
    out_specs.append(count_spec)
  return _call(
      functools.partial(_fwd_kernel, cfg=cfg), cfg, grid=(b, h, n_q), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, args=args, name="bytescale_flash_fwd", head_dim=d,
  )


def _dq_resident(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, do, lse, delta):
  b, h, _, d, n_q, _, _ = _dims(cfg, q, k)
  in_specs, args, q_spec, row_spec = _resident_q_major(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info)
  (dq,) = _call(
      functools.partial(_dq_kernel, cfg=cfg), cfg, grid=(b, h, n_q),
      in_specs=[*in_specs, q_spec, row_spec, row_spec], out_specs=[q_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)], args=(*args, do, lse, delta),
      name="bytescale_flash_dq", head_dim=d,
  )
  return dq


def _dkv_resident(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, do, lse, delta):
  # The R query heads of kv head g are heads g*R .. g*R+R-1, i.e. block g of size R on the head axis.
  # Per-query vectors as 1xQ rows (lse/delta: BxHxnQx1xbq), per-key ones as Cx1 columns (see _dkv_step).
  b, h, g, d, n_q, n_k, rep = _dims(cfg, q, k)
  bq, bk = cfg.block_q, cfg.block_k
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, g_, j: (b_, g_, j, 0))
  qh_spec = pl.BlockSpec((None, rep, n_q, bq, d), lambda b_, g_, j: (b_, g_, 0, 0, 0))
  rowh_spec = pl.BlockSpec((None, rep, n_q, 1, bq), lambda b_, g_, j: (b_, g_, 0, 0, 0))
  by_block = lambda x: x.reshape(b, n_q, 1, bq)
  return _call(
      functools.partial(_dkv_kernel, cfg=cfg, num_rep=rep), cfg, grid=(b, g, n_k),
      in_specs=[
          *_resident_meta_specs(cfg, n_q, n_k, kv_major=True), qh_spec, kv_spec, kv_spec, qh_spec, rowh_spec, rowh_spec,
      ],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      args=(
          q_info, kv_info, by_block(q_pos), by_block(q_seg), kv_pos[..., None], kv_seg[..., None],
          q.reshape(b, h, n_q, bq, d), k, v, do.reshape(b, h, n_q, bq, d),
          lse.reshape(b, h, n_q, 1, bq), delta.reshape(b, h, n_q, 1, bq),
      ),
      name="bytescale_flash_dkv", head_dim=d,
  )


# Streaming variant. Index maps get the grid indices, then the two prefetched tables (q_info, kv_info).


def _band_clamp(info_ref, b, x, y):
  """Block ``y`` of the other operand clamped into block ``x``'s visit band ``[lo, hi)`` (block lo if empty)."""
  lo, hi = info_ref[b, _LO, x], info_ref[b, _HI, x]
  return lax.min(lax.max(y, lo), lax.max(lo, hi - 1))


def _streaming_q_major(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg):
  """Shared by the forward and dq calls, grid (b, h, i, j): ``(in_specs, args, q_spec, row_spec)``."""
  _, _, _, d, _, _, rep = _dims(cfg, q, k)
  bq, bk = cfg.block_q, cfg.block_k
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, qi, _: (b, h // rep, _band_clamp(qi, b, i, j), 0))
  q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0))
  # 1xC rows as Bx(nK)x1xbk: the block's last two dims are then whole, which TPU needs for blocks under 128.
  kv_meta = pl.BlockSpec((None, None, 1, bk), lambda b, h, i, j, qi, _: (b, _band_clamp(qi, b, i, j), 0, 0))
  in_specs = [q_meta, q_meta, kv_meta, kv_meta, q_spec, kv_spec, kv_spec]
  by_block = lambda x: x.reshape(x.shape[0], -1, 1, bk)
  args = (q_pos[..., None], q_seg[..., None], by_block(kv_pos), by_block(kv_seg), q, k, v)
  return in_specs, args, q_spec, row_spec


def _forward_streaming(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info):
  from jax.experimental.pallas import tpu as pltpu

  b, h, _, d, n_q, n_k, _ = _dims(cfg, q, k)
  bq = cfg.block_q
  in_specs, args, q_spec, row_spec = _streaming_q_major(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)]
  out_specs = [q_spec, row_spec]
  if cfg.count_visits:
    count_shape, count_spec = _count_shape_and_spec(b, h, n_q, lambda b_, h_, i, j, *_: (b_, h_, i, 0, 0))
    out_shape.append(count_shape)
    out_specs.append(count_spec)
  scratch = [pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32)]
  return _call(
      functools.partial(_fwd_stream_kernel, cfg=cfg), cfg, grid=(b, h, n_q, n_k), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, args=args, name="bytescale_flash_fwd", head_dim=d,
      prefetch=(q_info, kv_info), scratch=scratch,
  )


def _dq_streaming(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, do, lse, delta):
  from jax.experimental.pallas import tpu as pltpu

  b, h, _, d, n_q, n_k, _ = _dims(cfg, q, k)
  in_specs, args, q_spec, row_spec = _streaming_q_major(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg)
  (dq,) = _call(
      functools.partial(_dq_stream_kernel, cfg=cfg), cfg, grid=(b, h, n_q, n_k),
      in_specs=[*in_specs, q_spec, row_spec, row_spec], out_specs=[q_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)], args=(*args, do, lse, delta),
      name="bytescale_flash_dq", head_dim=d, prefetch=(q_info, kv_info),
      scratch=[pltpu.VMEM((cfg.block_q, d), jnp.float32)],
  )
  return dq


def _dkv_streaming(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_info, kv_info, do, lse, delta):
  # Grid (b, g, j, r, i): query head g*R + r, its q block i clamped into kv block j's band.
  # Per-query vectors as 1xQ rows, per-key ones as Cx1 columns (see _dkv_step).
  from jax.experimental.pallas import tpu as pltpu

  b, _, g, d, n_q, n_k, rep = _dims(cfg, q, k)
  bq, bk = cfg.block_q, cfg.block_k
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, g_, j, r, i, *_: (b_, g_, j, 0))
  kv_meta = pl.BlockSpec((None, bk, 1), lambda b_, g_, j, r, i, *_: (b_, j, 0))

  def q_index(b_, g_, j, r, i, q_info_ref, kv_info_ref):  # (batch, query head, q block) of a grid step
    del q_info_ref
    return b_, g_ * rep + r, _band_clamp(kv_info_ref, b_, j, i)

  def q_map(*grid_and_tables):
    b_, h_, i = q_index(*grid_and_tables)
    return b_, h_, i, 0

  def row_map(*grid_and_tables):
    b_, h_, i = q_index(*grid_and_tables)
    return b_, h_, i, 0, 0

  def q_meta_map(*grid_and_tables):
    b_, _, i = q_index(*grid_and_tables)
    return b_, i, 0, 0

  # 1xQ rows blocked as ..x(nQ)x1xbq (lse/delta BxHxnQx1xbq): whole last two dims, as TPU needs under 128.
  q_spec = pl.BlockSpec((None, None, bq, d), q_map)
  row_spec = pl.BlockSpec((None, None, None, 1, bq), row_map)
  q_meta = pl.BlockSpec((None, None, 1, bq), q_meta_map)
  by_block = lambda x: x.reshape(*x.shape[:-2], n_q, 1, bq)  # ..xTx1 -> ..xnQx1xbq (free: trailing size 1)
  return _call(
      functools.partial(_dkv_stream_kernel, cfg=cfg), cfg, grid=(b, g, n_k, rep, n_q),
      in_specs=[q_meta, q_meta, kv_meta, kv_meta, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      args=(
          by_block(q_pos[..., None]), by_block(q_seg[..., None]), kv_pos[..., None], kv_seg[..., None],
          q, k, v, do, by_block(lse), by_block(delta),
      ),
      name="bytescale_flash_dkv", head_dim=d, prefetch=(q_info, kv_info),
      scratch=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
  )


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
    q_shape, s, *, causal, window, scale, block_q, block_k, interpret, backend=None, streaming=None,
    count_visits=False,
):
  backend = _backend() if backend is None else resolve_backend(backend)
  interpret = resolve_interpret(interpret, backend)
  if streaming is None:
    streaming = _DEFAULT_STREAMING[backend]
  if streaming and backend == "gpu":
    raise ValueError("streaming=True needs scratch memory, which the GPU (Triton) kernels lack: use streaming=None")
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
      interpret=interpret,
      streaming=bool(streaming),
      poison=_DEBUG.poison,
      count_visits=count_visits,
  )


def _prepare(cfg, q, k, v, mask: AttentionMask):
  """Transpose to head-major, pad to whole blocks (padding = segment 0), build the block tables."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  t_pad, s_pad = round_up(t, cfg.block_q), round_up(s, cfg.block_k)
  q_seg, kv_seg = mask.q_segment_ids_BxT, mask.kv_segment_ids_BxS
  q_seg = jnp.ones((b, t), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
  kv_seg = jnp.ones((b, s), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
  pad_t, pad_s = ((0, 0), (0, t_pad - t)), ((0, 0), (0, s_pad - s))
  q_pos = jnp.pad(mask.q_positions_BxT.astype(jnp.int32), pad_t)
  q_seg = jnp.pad(q_seg, pad_t)
  kv_pos = jnp.pad(mask.kv_positions_BxS.astype(jnp.int32), pad_s)
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
    mask: AttentionMask,
    *,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    streaming: bool | None = None,
):
  """Fused attention under ``mask`` with the semantics of ``attention_reference``; differentiable (Pallas backward).

  float32 or bfloat16 inputs (softmax and accumulation in float32). ``block_q``/``block_k`` override the
  per-backend defaults (powers of two on GPU; multiples of 8). Sequence lengths need not be multiples of the
  blocks. Works under ``jax.jit``; inside ``shard_map`` use ``check_vma=False``. ``backend`` (``"cpu"``,
  ``"gpu"``/``"cuda"``/``"rocm"``, ``"tpu"``; None = local) selects the specs, compiler params and default
  blocks. A non-local one is for lowering (``jax.jit(...).trace(...).lower(lowering_platforms=...)``) or for
  running that backend's configuration in interpret mode (``interpret=True``). ``streaming`` picks the kernel
  variant (module docstring); None = the backend's default (TPU: streaming; GPU: resident, the only one there).
  """
  check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  cfg = _resolve_config(
      q_BxTxHxK.shape, k_BxSxGxK.shape[1], causal=mask.causal, window=mask.window, scale=scale,
      block_q=block_q, block_k=block_k, interpret=interpret, backend=backend, streaming=streaming,
  )
  return _flash_jit(cfg, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)


@functools.partial(jax.jit, static_argnums=(0,))
def _flash_jit(cfg, q, k, v, mask):
  t = q.shape[1]
  args, _ = _prepare(cfg, q, k, v, mask)
  o_BxHxTxK = _flash_core(cfg, *args)
  return jnp.swapaxes(o_BxHxTxK[:, :, :t], 1, 2)


def block_visits(
    q_BxTxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    mask: AttentionMask,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    streaming: bool | None = None,
):
  """Introspection for tests/benchmarks: ``(table BxnQxnK bool, visits BxHxnQ int32)`` of ``flash_attention``
  on the same arguments (q, k and v give the shapes; the forward kernel runs to count).

  ``table`` is the block-pair table the kernels compute from; ``visits`` is what the forward kernel actually
  counted (kv blocks whose body ran) for each (batch, head, q block).
  """
  check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  cfg = _resolve_config(
      q_BxTxHxK.shape, k_BxSxGxK.shape[1], causal=mask.causal, window=mask.window, scale=None,
      block_q=block_q, block_k=block_k, interpret=interpret, backend=backend, streaming=streaming,
      count_visits=True,
  )
  args, table = _prepare(cfg, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  visits = _forward(cfg, *args)[2][..., 0, 0]
  return table, visits


def default_block_sizes(head_dim: int, backend: str | None = None) -> tuple[int, int]:
  """The (block_q, block_k) used when none are given (before shrinking to short sequences)."""
  backend = _backend() if backend is None else resolve_backend(backend)
  return _DEFAULT_BLOCKS[backend].get(head_dim, _DEFAULT_BLOCKS[backend][128])


__all__ = ["flash_attention", "block_visits", "default_block_sizes", "poison_outputs"]
