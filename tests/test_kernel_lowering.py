"""The Pallas kernels lowered for TPU (Mosaic) and GPU (Triton) on this CPU host: no device, no compile, no run.

Lowering runs every check Pallas makes for the real backend: Mosaic block shapes ((8, 128) tiles or full dims),
memory spaces (SMEM tables), primitives and dtypes the kernel body may use, Triton's power-of-two shapes, grid
and compiler params. On top, ``test_tpu_vmem_budget`` adds up the VMEM the TPU kernels' blocks take. What no
CPU run can check: Mosaic's layout passes and Triton's PTX compile (libtpu / XLA:GPU, at compile time),
run-time faults, speed -- that needs the device.

The target device is named with ``jax.sharding.AbstractDevice`` in an abstract mesh: the Triton lowering needs
the GPU's compute capability, and the Mosaic lowering may ask for the TPU generation.
"""

import math
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale.kernels import flash_attention as fa
from bytescale.kernels import patch_pool as pp
from bytescale.ops.attention import attention_reference
from bytescale.ops.mask import AttentionMask, segment_positions
from bytescale.ops.pooling import segment_pool_reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# platform -> (kernel backend, the device the lowering targets, custom call the kernels must become)
TARGETS = {
    "tpu": ("tpu", jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
            "tpu_custom_call"),
    "cuda": ("gpu", jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
             "__gpu$xla.gpu.triton"),
}
PLATFORMS = list(TARGETS)


def target_mesh(platform):
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=TARGETS[platform][1])


def lowered_kernels(fn, args, platform):
  """Lower ``jit(fn)`` for ``platform``; return ``[(custom call target, bytescale kernel name)]`` in order."""
  with jax.sharding.use_abstract_mesh(target_mesh(platform)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  calls = []
  for line in text.splitlines():
    target = re.search(r"custom_call @([\w$.]+)\(", line)
    if target:
      names = set(re.findall(r"bytescale_\w+", line))
      calls.append((target.group(1), names.pop() if len(names) == 1 else f"unnamed: {sorted(names)}"))
  return calls


def assert_kernels(calls, platform, expected_names):
  want_target = TARGETS[platform][2]
  assert all(target == want_target for target, _ in calls), calls
  assert sorted(name for _, name in calls) == sorted(expected_names), calls


# ---------------------------------------------------------------------------------------------------------
# Flash attention: forward alone, and forward + backward (fwd, dq, dkv kernels).

# name -> (B, T, S, H, G, causal, window, segments); T and S are no multiple of any block.
FLASH_CASES = {
    "causal_window_docs_gqa": (2, 300, 300, 4, 2, True, 100, True),
    "causal_mha": (1, 200, 200, 2, 2, True, None, False),
    "noncausal_window_docs": (1, 150, 150, 4, 1, False, 50, True),
    "cross_longer_kv": (1, 100, 333, 2, 1, False, None, True),
    "tiny": (2, 5, 5, 2, 2, True, None, False),
}


def flash_args(case, head_dim, dtype):
  b, t, s, h, g = case[:5]
  sds = jax.ShapeDtypeStruct
  return (sds((b, t, h, head_dim), dtype), sds((b, s, g, head_dim), dtype), sds((b, s, g, head_dim), dtype),
          sds((b, t), jnp.int32), sds((b, s), jnp.int32), sds((b, t), jnp.int32), sds((b, s), jnp.int32))


def flash_fn(case, backend, **kw):
  causal, window, segments = case[5:]

  def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    mask = AttentionMask(q_pos, kv_pos, q_seg if segments else None, kv_seg if segments else None, causal=causal,
                         window=window)
    return fa.flash_attention(q, k, v, mask, backend=backend, **kw)

  def grads(q, k, v, *meta):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, *meta).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return attend, grads


def check_flash_lowers(platform, case, head_dim, dtype, **kw):
  attend, grads = flash_fn(case, TARGETS[platform][0], **kw)
  args = flash_args(case, head_dim, dtype)
  assert_kernels(lowered_kernels(attend, args, platform), platform, ["bytescale_flash_fwd"])
  assert_kernels(
      lowered_kernels(grads, args, platform), platform,
      ["bytescale_flash_fwd", "bytescale_flash_dq", "bytescale_flash_dkv"],
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_flash_lowers_every_head_dim_and_dtype(platform, head_dim, dtype):
  check_flash_lowers(platform, FLASH_CASES["causal_window_docs_gqa"], head_dim, dtype)


@pytest.mark.parametrize("case", [c for c in FLASH_CASES if c != "causal_window_docs_gqa"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_flash_lowers_every_mask_layout(platform, case):
  check_flash_lowers(platform, FLASH_CASES[case], 128, jnp.bfloat16)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_flash_lowers_with_explicit_small_blocks(platform):
  # 32: the smallest power of two that is a multiple of 8 for both; several kv blocks per row.
  check_flash_lowers(platform, FLASH_CASES["causal_window_docs_gqa"], 64, jnp.float32, block_q=32, block_k=32)


def test_flash_resident_variant_lowers_for_tpu():
  """TPU defaults to the streaming kernels; the resident ones (``streaming=False``) stay an option there."""
  check_flash_lowers("tpu", FLASH_CASES["causal_window_docs_gqa"], 128, jnp.bfloat16, streaming=False)


def test_tpu_default_streams_with_prefetched_tables_and_scratch():
  """The TPU kernels' grids stream the other operand's blocks (and dk/dv the query heads) on inner axes."""
  case = FLASH_CASES["causal_window_docs_gqa"]  # B=2, T=S=300, H=4, G=2; TPU blocks for 300 tokens: 256
  _, grads = flash_fn(case, "tpu")
  grids = {}
  for eqn in _pallas_calls(jax.make_jaxpr(grads)(*flash_args(case, 128, jnp.bfloat16)).jaxpr):
    mapping = eqn.params["grid_mapping"]
    grids[eqn.params["name"]] = (mapping.grid, mapping.num_index_operands, mapping.num_scratch_operands)
  assert grids == {  # (grid, scalar-prefetched tables, scratch buffers)
      "bytescale_flash_fwd": ((2, 4, 2, 2), 2, 3),  # (B, H, nQ, nK); acc, max, sum
      "bytescale_flash_dq": ((2, 4, 2, 2), 2, 1),  # (B, H, nQ, nK); dq
      "bytescale_flash_dkv": ((2, 2, 2, 2, 2), 2, 2),  # (B, G, nK, R, nQ); dk, dv
  }, grids


@pytest.mark.parametrize("platform", PLATFORMS)
def test_block_visits_and_poisoned_outputs_lower(platform):
  """The test-only variants: the visit-count output and the NaN-aliased outputs have their own specs."""
  backend = TARGETS[platform][0]
  args = flash_args(FLASH_CASES["causal_mha"], 64, jnp.float32)
  visits = lambda q, k, v, q_pos, kv_pos, *_: fa.block_visits(q, k, v, AttentionMask(q_pos, kv_pos), backend=backend)[1]
  assert_kernels(lowered_kernels(visits, args, platform), platform, ["bytescale_flash_fwd"])
  with fa.poison_outputs():
    _, grads = flash_fn(FLASH_CASES["causal_mha"], backend)
    calls = lowered_kernels(grads, args, platform)
  assert_kernels(calls, platform, ["bytescale_flash_fwd", "bytescale_flash_dq", "bytescale_flash_dkv"])


def test_tpu_export_accepts_the_kernels():
  """``jax.export`` (an artifact a TPU host could load) accepts the Mosaic custom calls as stable."""
  _, grads = flash_fn(FLASH_CASES["causal_window_docs_gqa"], "tpu")
  with jax.sharding.use_abstract_mesh(target_mesh("tpu")):
    exported = jax.export.export(jax.jit(grads), platforms=("tpu",))(*flash_args(
        FLASH_CASES["causal_window_docs_gqa"], 128, jnp.bfloat16))
  assert exported.platforms == ("tpu",)
  assert exported.mlir_module().count("tpu_custom_call") >= 3


# ---------------------------------------------------------------------------------------------------------
# Patch pooling.


def pool_fns(num_segments, op, backend, **kw):
  pool = lambda x, ids: pp.patch_pool(x, ids, num_segments, op, backend=backend, **kw)
  grad = lambda x, ids: jax.grad(lambda x: jnp.sum(pool(x, ids).astype(jnp.float32)))(x)
  return pool, grad


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", [96, 200])  # one feature block / several, neither a multiple of 128
@pytest.mark.parametrize("platform", PLATFORMS)
def test_patch_pool_lowers(platform, dim, dtype, op):
  pool, grad = pool_fns(37, op, TARGETS[platform][0])
  args = (jax.ShapeDtypeStruct((2, 300, dim), dtype), jax.ShapeDtypeStruct((2, 300), jnp.int32))
  kind = "max" if op == "max" else "sum"
  assert_kernels(lowered_kernels(pool, args, platform), platform, [f"bytescale_patch_pool_{kind}_fwd"])
  calls = lowered_kernels(grad, args, platform)
  # The sum backward needs no forward output, so XLA drops that kernel; max needs its arg-max.
  expected = [f"bytescale_patch_pool_{kind}_bwd"] + (["bytescale_patch_pool_max_fwd"] if op == "max" else [])
  assert_kernels(calls, platform, expected)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_patch_pool_rejects_blocks_the_backend_cannot_tile(platform, monkeypatch):
  """Explicit blocks are validated up front; bypassing that check, the real lowering fails on the same blocks."""
  backend = TARGETS[platform][0]
  field, block = ("block_d", 64) if platform == "tpu" else ("block_t", 24)
  x = jax.ShapeDtypeStruct((1, 64, 200), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
  pool, _ = pool_fns(10, "sum", backend, **{field: block})
  with pytest.raises(ValueError, match=field):
    lowered_kernels(pool, (x, ids), platform)
  monkeypatch.setattr(pp, "_check_block", lambda *a, **k: None)
  lowering_rule = "divisible by 8 and 128" if platform == "tpu" else "power of 2"
  with pytest.raises(ValueError, match=lowering_rule):
    lowered_kernels(pool, (x, ids), platform)


# ---------------------------------------------------------------------------------------------------------
# TPU VMEM: every blocked operand sits in VMEM, padded to whole tiles and double-buffered; scratch once.

VMEM_LIMIT = 16 * 2**20  # default scoped VMEM limit of TPU v4/v5e (v6e: 32 MiB); above it Mosaic fails to compile


def _pallas_calls(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _pallas_calls(sub)


def _tiled_bytes(shape, dtype):
  itemsize = jnp.dtype(dtype).itemsize
  sublanes = 8 * (4 // itemsize)
  minor = -(-shape[-1] // 128) * 128
  second = -(-shape[-2] // sublanes) * sublanes if len(shape) > 1 else 1
  return math.prod(shape[:-2]) * second * minor * itemsize


def tpu_vmem_bytes(fn, args):
  """``{kernel name: bytes}``: blocks padded to (8 * packing, 128) tiles, two buffers each, plus the VMEM
  scratch (one buffer); SMEM (block tables, scalar-prefetched tables) excluded."""
  usage = {}
  for eqn in _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr):
    grid_mapping = eqn.params["grid_mapping"]
    total = 0
    for mapping in grid_mapping.block_mappings:
      block = mapping.block_aval
      if "smem" not in str(block.memory_space).lower():
        total += 2 * _tiled_bytes(tuple(block.shape), block.dtype)
    for scratch in eqn.params["jaxpr"].invars[grid_mapping.slice_scratch_ops]:
      assert "vmem" in str(scratch.aval).lower(), scratch.aval
      total += _tiled_bytes(tuple(scratch.aval.shape), scratch.aval.dtype)
    usage[eqn.params["name"]] = total
  return usage


def _flash_vmem(tokens, streaming=None):
  # GQA with R = 4 query heads per kv head, head dim 128, bf16, packed documents, TPU default blocks.
  case = (1, tokens, tokens, 8, 2, True, None, True)
  _, grads = flash_fn(case, "tpu", streaming=streaming)
  return tpu_vmem_bytes(grads, flash_args(case, 128, jnp.bfloat16))


def test_tpu_vmem_budget():
  """A 32k-token GQA backward (streaming, the TPU default), a 2k-token one (resident kernels) and a 4k-token
  pooling stay inside the default scoped VMEM.

  The resident forward/dq kernels hold the whole K/V row of their kv group, the resident dk/dv kernel the
  whole Q/dO row of its R query heads: at 32k tokens they need far more than the limit (checked below, so
  the estimate demonstrably sees it). Before the dk/dv kernel kept its per-query vectors as 1xQ rows, their
  Qx1 columns (padded to 128 lanes) took 28.5 MiB at 2k.
  """
  usage = _flash_vmem(32768)
  resident_2k = _flash_vmem(2048, streaming=False)
  usage.update({f"{name} (resident, 2k)": used for name, used in resident_2k.items()})
  _, pool_grad = pool_fns(1024, "max", "tpu")
  x, ids = jax.ShapeDtypeStruct((1, 4096, 512), jnp.float32), jax.ShapeDtypeStruct((1, 4096), jnp.int32)
  usage.update(tpu_vmem_bytes(pool_grad, (x, ids)))
  flash = ["bytescale_flash_fwd", "bytescale_flash_dq", "bytescale_flash_dkv"]
  assert set(usage) == {*flash, *(f"{n} (resident, 2k)" for n in flash),
                        "bytescale_patch_pool_max_fwd", "bytescale_patch_pool_max_bwd"}
  over = {name: f"{used / 2**20:.1f} MiB" for name, used in usage.items() if used > VMEM_LIMIT}
  assert not over, over
  resident_32k = _flash_vmem(32768, streaming=False)
  assert all(resident_32k[name] > 2 * VMEM_LIMIT for name in flash), resident_32k


# ---------------------------------------------------------------------------------------------------------
# The accelerator configurations (default blocks, SMEM tables, compiler params aside) run in interpret mode.


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_accelerator_configs_match_reference_in_interpret_mode(backend, rng):
  b, t, h, g, d = 1, 150, 4, 2, 64
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, g, g))
  seg = jnp.asarray(np.repeat([1, 2, 3], [60, 70, 20])[None], jnp.int32)
  pos = segment_positions(seg)
  mask = AttentionMask.self_attention(pos, seg, window=40)
  w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  kernel = lambda q, k, v: jnp.sum(fa.flash_attention(q, k, v, mask, backend=backend, interpret=True) * w)
  reference = lambda q, k, v: jnp.sum(attention_reference(q, k, v, mask) * w)
  grads = [jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v) for f in (kernel, reference)]  # jitted: one compile each
  for got, want in zip(*grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
  # The visit counter (its own output spec) counts exactly the kv blocks the block table marks.
  table, visits = jax.jit(lambda q, k, v: fa.block_visits(q, k, v, mask, backend=backend, interpret=True))(q, k, v)
  want_visits = np.broadcast_to(np.asarray(table).sum(-1)[:, None], (b, h, table.shape[1]))
  np.testing.assert_array_equal(np.asarray(visits), want_visits)

  x = jnp.asarray(rng.normal(size=(2, 90, 200)), jnp.float32)
  ids = jnp.asarray(np.sort(rng.integers(-1, 25, size=(2, 90)), axis=1), jnp.int32)
  for op in ("mean", "max"):
    got = jax.jit(lambda x, ids: pp.patch_pool(x, ids, 24, op, backend=backend, interpret=True))(x, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(segment_pool_reference(x, ids, 24, op)), atol=1e-5)
