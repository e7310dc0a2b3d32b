"""Analytic FLOP counts against XLA's cost analysis of the compiled program, and against hand formulas.

XLA checks: ``attention="dense"`` counts every matmul the plain XLA path runs, so XLA's cost analysis of the
compiled forward pass (or training step: ``value_and_grad`` of the cross-entropy, as a train step computes) must
agree within 5%. XLA also counts elementwise work (softmax, norms, RoPE, the loss) that the count leaves out, so
the measured figure is at least the predicted one, by a few percent at realistic head dims (>= 32; at head dim
16 a score costs 4 * 16 matmul FLOPs and its ~8 elementwise FLOPs alone are ~10%). Models are built abstractly
(``jax.eval_shape``) and programs compiled, never run; stacks are unrolled (``scan_layers=False``): XLA counts a
loop body once, whatever its trip count.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale.models.registry import build_model
from bytescale import vocab
from bytescale.models import mtp as heads
from bytescale.configs import ByteLMConfig, TransformerConfig
from bytescale.flops import FlopCount, attended_keys, xla_flops
from bytescale.models.bytelm import flops_per_byte as bytelm_flops
from bytescale.models.megabyte import flops_per_byte as megabyte_flops
from bytescale.models.registry import flops_per_byte
from bytescale.models import ByteLM
from bytescale.models.blt import BLT, BLTConfig
from bytescale.models.blt import flops_per_byte as blt_flops
from bytescale.models.megabyte import MegaByte, MegaByteConfig
from bytescale.ops.mask import AttentionMask
from bytescale.ops.losses import masked_cross_entropy
from bytescale.patching import PatchingConfig

BATCH = 2


def stack(d, layers, num_heads, head_dim=32, mlp=None, *, kv_heads=None, window=None, remat="none"):
  # Unrolled layers: XLA's cost analysis counts a while-loop body once, whatever its trip count.
  return TransformerConfig(d_model=d, num_layers=layers, num_heads=num_heads, num_kv_heads=kv_heads or num_heads,
                           head_dim=head_dim, mlp_hidden=mlp or 3 * d, window=window, remat=remat, scan_layers=False)


def abstract(build):
  """``(graphdef, state)`` of ``build()`` with ``jax.ShapeDtypeStruct`` leaves: nothing is initialised."""
  graphdefs = []

  def split():
    graphdef, state = nnx.split(build())
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(split)
  return graphdefs[0], state


def ids_spec(seq_len):
  return jax.ShapeDtypeStruct((BATCH, seq_len), jnp.int32)


def cross_entropy(graphdef):
  def loss(state, ids):
    logits = nnx.merge(graphdef, state)(ids).logits_BxTxV
    return masked_cross_entropy(logits, ids, jnp.ones(ids.shape, jnp.float32))[0]

  return loss


def measured_forward(graphdef, state, seq_len):
  logits = lambda s, x: nnx.merge(graphdef, s)(x).logits_BxTxV  # noqa: E731
  return xla_flops(logits, state, ids_spec(seq_len)) / (BATCH * seq_len)


def measured_training(loss, state, *args, num_bytes):
  return xla_flops(lambda s, *a: jax.value_and_grad(loss)(s, *a), state, *args) / num_bytes


def assert_agrees(measured, predicted, what):
  # Below 1: the count has a matmul XLA does not run. Above 1.05: XLA runs one the count misses.
  assert 0.995 <= measured / predicted < 1.05, (what, measured, predicted, measured / predicted)


# --- ByteLM -------------------------------------------------------------------------------------------------

def bytelm_config(d, layers, num_heads, kv_heads, head_dim, mlp, window=None, remat="none"):
  return ByteLMConfig(stack=stack(d, layers, num_heads, head_dim, mlp, kv_heads=kv_heads, window=window, remat=remat),
                      max_seq_len=512)


@pytest.mark.parametrize("shape, seq_len", [((64, 2, 4, 4, 32, 192), 128), ((128, 3, 4, 2, 64, 352), 256)])
def test_bytelm_forward_matches_xla(shape, seq_len):
  config = bytelm_config(*shape)
  graphdef, state = abstract(lambda: ByteLM(config, rngs=nnx.Rngs(0)))
  measured = measured_forward(graphdef, state, seq_len)
  assert_agrees(measured, bytelm_flops(config, seq_len, attention="dense").forward, shape)


@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch"])
def test_bytelm_training_step_matches_xla(remat):
  """What the remat policy recomputes comes on top of the training count (``training_with_recompute``); without
  it, the count is what XLA runs for the same model without remat."""
  config = bytelm_config(128, 2, 2, 2, 64, 384, window=64, remat=remat)
  graphdef, state = abstract(lambda: ByteLM(config, rngs=nnx.Rngs(0)))
  measured = measured_training(cross_entropy(graphdef), state, ids_spec(128), num_bytes=BATCH * 128)
  count = bytelm_flops(config, 128, attention="dense")
  assert_agrees(measured, count.training_with_recompute, remat)
  assert (count.training_with_recompute > count.training) == (remat != "none")
  assert_agrees(measured_without_remat(config, 128), count.training, (remat, "without recompute"))


_WITHOUT_REMAT = {}


def measured_without_remat(config, seq_len):
  """XLA's training FLOPs per byte of ``config`` with ``remat="none"`` (compiled once per config)."""
  plain = dataclasses.replace(config, stack=dataclasses.replace(config.stack, remat="none"))
  if (plain, seq_len) not in _WITHOUT_REMAT:
    graphdef, state = abstract(lambda: ByteLM(plain, rngs=nnx.Rngs(0)))
    _WITHOUT_REMAT[plain, seq_len] = measured_training(cross_entropy(graphdef), state, ids_spec(seq_len),
                                                       num_bytes=BATCH * seq_len)
  return _WITHOUT_REMAT[plain, seq_len]


def test_hand_formula_for_a_square_model():
  d, layers, t = 64, 3, 100
  config = bytelm_config(d, layers, 4, 4, 16, 4 * d)
  count = bytelm_flops(config, t, convention="spacebyte")
  # SpaceByte convention, in multiply-adds: 4D^2 QKVO + our SwiGLU's 3 matrices of D x 4D + 2*T*D attention.
  multiply_adds = layers * (4 * d * d + 3 * d * 4 * d + 2 * t * d) + d * vocab.VOCAB_SIZE
  # 2 FLOPs each forward; backward, 2 for the gradient of the input and 2 for that of the weight (or other operand).
  assert count.forward == pytest.approx(2 * multiply_adds)
  assert count.training == pytest.approx((2 + 2 + 2) * multiply_adds)


def test_attended_keys_brute_force():
  for context, window in [(10, None), (10, 3), (7, 7), (9, 20)]:
    keys = [min(t + 1, window or t + 1) for t in range(context)]
    assert attended_keys(context, window=window, convention="exact", attention="causal") == pytest.approx(
        sum(keys) / context)


def test_unknown_config_raises():
  with pytest.raises(ValueError, match="no model in bytescale.models.registry.MODELS uses object"):
    flops_per_byte(object(), 10)


def test_flop_count_arithmetic_keeps_frozen_and_recomputed_flops():
  a = FlopCount({"x": 10.0, "y": 4.0}, recomputed={"y": 2.0})
  b = FlopCount({"x": 6.0}).scaled(0.5, "m.").as_frozen()
  total = a + b + FlopCount({"x": 1.0})
  assert total.components == {"x": 11.0, "y": 4.0, "m.x": 3.0}
  assert total.training == 3 * 15.0 + 3.0  # the frozen part runs forward only
  assert total.training_with_recompute == total.training + 2.0
  assert total.as_dict()["training_per_byte"] == total.training


# --- MegaByte -----------------------------------------------------------------------------------------------

def megabyte_config(patch_size, d_local=64, **fields):
  return MegaByteConfig(global_stack=stack(32 * patch_size, 2, 4), local_stack=stack(d_local, 2, 2),
                        patch_size=patch_size, max_seq_len=512, **fields)


@pytest.mark.parametrize("patch_size, seq_len, fields", [
    (4, 127, {}),
    (4, 128, {}),  # a whole number of patches: the pad patch makes the model run one patch more
    (8, 255, {"cross_patch_r": 3}),
    (8, 256, {"d_local": 128, "tie_embeddings": True, "per_position_projection": True}),
    (4, 128, {"strided_inference": True}),  # a second pass over the row shifted by P // 2
])
def test_megabyte_forward_matches_xla(patch_size, seq_len, fields):
  config = megabyte_config(patch_size, **fields)
  graphdef, state = abstract(lambda: MegaByte(config, rngs=nnx.Rngs(0)))
  measured = measured_forward(graphdef, state, seq_len)
  assert_agrees(measured, flops_per_byte(config, seq_len, attention="dense").forward, (patch_size, seq_len, fields))


def test_megabyte_training_step_matches_xla():
  config = megabyte_config(8)
  graphdef, state = abstract(lambda: MegaByte(config, rngs=nnx.Rngs(0)))
  measured = measured_training(cross_entropy(graphdef), state, ids_spec(200), num_bytes=BATCH * 200)
  assert_agrees(measured, flops_per_byte(config, 200, attention="dense").training, "training")


def test_megabyte_spacebyte_formula():
  """SpaceByte's MegaByte formula (REFERENCE.md section 2), with e_ff = 4 matched by a SwiGLU of width 8D/3
  (3 * D * 8D/3 = 2 * D * 4D multiply-adds) and square QKVO."""
  p, t, v = 4, 1000, vocab.VOCAB_SIZE
  d, l_g, d_l, l_l = 384, 3, 96, 2
  config = MegaByteConfig(global_stack=stack(d, l_g, 6, 64, 8 * d // 3),
                          local_stack=stack(d_l, l_l, 3, 32, 8 * d_l // 3), patch_size=p)
  m_g = l_g * (4 * d**2 + 2 * 4 * d**2)
  m_l = d_l * d / p + l_l * (4 * d_l**2 + 2 * 4 * d_l**2) + d_l * v
  expected = 2 * m_g / p + 2 * l_g * (2 * (t / p) * d) / p + 2 * m_l + 2 * l_l * (2 * p * d_l)
  assert megabyte_flops(config, t, convention="spacebyte").forward == pytest.approx(expected)


def test_megabyte_causal_local_keys_with_cross_patch_brute_force():
  """Causal exact count of the local attention: every (query, key) pair the local mask lets through, counted on
  an interior patch (in-patch position i sees its r previous-patch keys and i + 1 of its own)."""
  p, r = 8, 3
  config = megabyte_config(p, cross_patch_r=r)
  q_positions = np.arange(p, 2 * p)  # patch 1; keys: the last r of patch 0, then its own
  kv_positions = np.arange(p - r, 2 * p)
  mask = np.asarray(AttentionMask(jnp.asarray(q_positions)[None], jnp.asarray(kv_positions)[None], causal=True).dense())
  local = config.local_stack
  seq_len = 255  # 256 local positions, 32 patches
  per_position = 2 * 2 * local.num_heads * local.head_dim * mask.sum() / p
  count = megabyte_flops(config, seq_len)
  assert count.components["local_attention"] == pytest.approx(local.num_layers * per_position * 256 / seq_len)


# --- BLT ----------------------------------------------------------------------------------------------------

def blt_config(stride, width, **fields):
  """Strided patches with ``max_patches = seq_len / stride``: every slot holds a patch."""
  return BLTConfig(encoder=stack(width, 1, width // 32, window=32), global_stack=stack(2 * width, 2, 4),
                   decoder=stack(width, 2, width // 32, window=32), hash_ngrams=(3, 4, 5), hash_buckets=512,
                   patching=PatchingConfig("strided", stride=stride, max_patches_ratio=1 / stride), max_seq_len=512,
                   **fields)


# Width 128 at 256 bytes repeats the width-64 checks at twice the size: slow only.
@pytest.mark.parametrize("stride, width, seq_len", [(2, 64, 128), (4, 64, 128), (8, 64, 128),
                                                     pytest.param(4, 128, 256, marks=pytest.mark.slow),
                                                     pytest.param(8, 128, 256, marks=pytest.mark.slow)])
def test_blt_forward_matches_xla(stride, width, seq_len):
  config = blt_config(stride, width)
  graphdef, state = abstract(lambda: BLT(config, rngs=nnx.Rngs(0)))
  measured = measured_forward(graphdef, state, seq_len)
  assert_agrees(measured, flops_per_byte(config, seq_len, attention="dense").forward, (stride, width))


def test_blt_training_step_matches_xla():
  config = blt_config(4, 64)
  graphdef, state = abstract(lambda: BLT(config, rngs=nnx.Rngs(0)))
  measured = measured_training(cross_entropy(graphdef), state, ids_spec(128), num_bytes=BATCH * 128)
  assert_agrees(measured, flops_per_byte(config, 128, attention="dense").training, "training")


def test_blt_entropy_model_is_reported_separately_and_matches_xla():
  """Entropy patching: by default the count leaves the entropy model out (as the paper); asked for, it adds
  ``entropy_model.*`` components, one forward pass per entropy window (64-byte windows overlapping by half over
  128 bytes: 3 windows), and no backward pass in training. Both agree with XLA."""
  entropy_config = ByteLMConfig(stack=stack(64, 2, 2), max_seq_len=64)
  config = dataclasses.replace(blt_config(4, 64), entropy_model_config=entropy_config,
                               patching=PatchingConfig("entropy", threshold=1.0, max_patches_ratio=0.25))
  graphdef, state = abstract(lambda: BLT(config, rngs=nnx.Rngs(0), entropy_lm=ByteLM(entropy_config,
                                                                                       rngs=nnx.Rngs(1))))
  without = blt_flops(config, 128, attention="dense")
  count = blt_flops(config, 128, attention="dense", include_entropy_model=True)
  assert not any(name.startswith("entropy_model.") for name in without.components)
  entropy_part = {name: value for name, value in count.components.items() if name.startswith("entropy_model.")}
  assert sum(entropy_part.values()) == pytest.approx(3 * 64 / 128 * bytelm_flops(entropy_config, 64,
                                                                                  attention="dense").forward)
  assert count.forward == pytest.approx(without.forward + sum(entropy_part.values()))
  assert count.training == pytest.approx(without.training + sum(entropy_part.values()))

  assert_agrees(measured_forward(graphdef, state, 128), count.forward, "forward")
  measured = measured_training(cross_entropy(graphdef), state, ids_spec(128), num_bytes=BATCH * 128)
  assert_agrees(measured, count.training, "training")


def test_blt_causal_count_brute_force():
  """The causal exact count of every attention, from the masks themselves: windowed byte attention in the
  encoder and decoder, causal attention over patches, encoder queries over the bytes of their own patch,
  decoder bytes over the k slots of their patch; all other components as in the dense count."""
  stride, seq_len, q = 4, 64, 2
  config = dataclasses.replace(blt_config(stride, 64), queries_per_patch=q)
  causal = blt_flops(config, seq_len)
  dense = blt_flops(config, seq_len, attention="dense")
  per_pair = lambda s: 2 * 2 * s.num_heads * s.head_dim  # noqa: E731  FLOPs per (query head, key) pair

  def pairs(positions, window):
    p = jnp.asarray(positions)[None]
    return int(np.asarray(AttentionMask(p, p, causal=True, window=window).dense()).sum())

  patches = seq_len // stride
  byte_pairs_e = pairs(np.arange(seq_len), config.encoder.window)
  byte_pairs_d = pairs(np.arange(seq_len), config.decoder.window)
  patch_pairs = pairs(np.arange(patches), None)
  e, g, d = config.encoder, config.global_stack, config.decoder
  assert causal.components["encoder.attention"] == pytest.approx(e.num_layers * per_pair(e) * byte_pairs_e / seq_len)
  assert causal.components["decoder.attention"] == pytest.approx(d.num_layers * per_pair(d) * byte_pairs_d / seq_len)
  assert causal.components["global.attention"] == pytest.approx(g.num_layers * per_pair(g) * patch_pairs / seq_len)
  # Encoder patch queries see only the bytes of their own patch in both counts (the XLA path gathers them too).
  assert dense.components["encoder.cross_attention"] == pytest.approx(causal.components["encoder.cross_attention"])
  assert causal.components["decoder.cross_attention"] == dense.components["decoder.cross_attention"]
  for name in ("encoder.qkvo", "encoder.mlp", "global.qkvo", "global.mlp", "decoder.qkvo", "decoder.mlp", "unembed"):
    assert causal.components[name] == pytest.approx(dense.components[name]), name


# --- Multi-token heads --------------------------------------------------------------------------------------

def mtp_config(d, variant, n, memory_efficient=False):
  trunk = bytelm_config(d, 2, d // 32, d // 32, 32, 3 * d)
  return heads.apply_overrides(trunk, {"mtp_heads": str(n), "mtp_variant": variant,
                                       "mtp_memory_efficient": str(memory_efficient).lower()})


def mtp_batch(seq_len):
  spec = lambda dtype: jax.ShapeDtypeStruct((BATCH, seq_len), dtype)  # noqa: E731
  return {"inputs": spec(jnp.int32), "targets": spec(jnp.int32), "loss_mask": spec(jnp.float32),
          "segment_ids": spec(jnp.int32)}


def mtp_loss(graphdef):
  return lambda state, batch: heads.multi_token_loss(nnx.merge(graphdef, state), batch)[0]


# d_model 128: each head's unembedding brings a logsumexp over the vocabulary (elementwise, uncounted) that is
# ~5% of the 2 * d * V matmul at d = 64.
# Parallel with 4 heads repeats parallel with 2 (sequential with 4 heads stays): slow only.
@pytest.mark.parametrize("d, variant, n", [(128, "parallel", 2), pytest.param(128, "parallel", 4,
                                                                              marks=pytest.mark.slow),
                                           (128, "sequential", 2), (192, "sequential", 4)])
def test_multi_token_loss_forward_matches_xla(d, variant, n):
  """The loss with every head's logits at once (``mtp_memory_efficient=False``: the memory-efficient loss runs
  the heads in a scan, which XLA would count once)."""
  config = mtp_config(d, variant, n)
  graphdef, state = abstract(lambda: build_model(config, seed=0))
  measured = xla_flops(mtp_loss(graphdef), state, mtp_batch(128)) / (BATCH * 128)
  assert_agrees(measured, flops_per_byte(config, 128, attention="dense").forward, (variant, n))


@pytest.mark.parametrize("variant, n, memory_efficient", [("parallel", 4, False), ("sequential", 2, True)])
def test_multi_token_training_step_matches_xla(variant, n, memory_efficient):
  """Memory-efficient training recomputes each head (block, combine, unembedding) in the backward pass:
  sequential with 2 heads runs head 1 outside the scan and head 2 in a scan of one step, so XLA sees it all."""
  config = mtp_config(128, variant, n, memory_efficient)
  graphdef, state = abstract(lambda: build_model(config, seed=0))
  measured = measured_training(mtp_loss(graphdef), state, mtp_batch(128), num_bytes=BATCH * 128)
  count = flops_per_byte(config, 128, attention="dense")
  assert_agrees(measured, count.training_with_recompute, (variant, n, memory_efficient))
  assert (count.training_with_recompute > count.training) == memory_efficient
