"""Analytic FLOP counts against XLA's cost analysis of the compiled program, and against hand formulas."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bytescale import vocab
from bytescale.configs import ByteLMConfig, TransformerConfig
from bytescale.flops import attended_keys, bytelm_flops, flops_per_byte, xla_flops
from bytescale.models import ByteLM


def bytelm_config(d, layers, heads, kv_heads, head_dim, mlp, window=None):
  # Unrolled layers: XLA's cost analysis counts a while-loop body once, whatever its trip count.
  return ByteLMConfig(stack=TransformerConfig(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                                              head_dim=head_dim, mlp_hidden=mlp, window=window, scan_layers=False),
                      max_seq_len=512)


@pytest.mark.parametrize("shape, seq_len", [((64, 2, 4, 4, 32, 192), 128), ((128, 3, 4, 2, 64, 352), 256)])
def test_exact_dense_count_matches_xla_forward(shape, seq_len):
  config = bytelm_config(*shape)
  model = ByteLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids = jnp.zeros((2, seq_len), jnp.int32)
  measured = xla_flops(lambda p, x: nnx.merge(graphdef, p)(x).logits_BxTxV, params, ids) / ids.size
  predicted = bytelm_flops(config, seq_len, attention="dense").forward
  assert abs(measured / predicted - 1) < 0.05, (measured, predicted)


def test_exact_dense_count_matches_xla_training_step():
  config = bytelm_config(96, 2, 4, 4, 24, 256)
  model = ByteLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids = jnp.zeros((2, 128), jnp.int32)

  def step(p, x):
    return jax.grad(lambda q: jnp.mean(nnx.merge(graphdef, q)(x).logits_BxTxV))(p)

  measured = xla_flops(step, params, ids) / ids.size
  predicted = bytelm_flops(config, 128, attention="dense").training
  assert abs(measured / predicted - 1) < 0.05, (measured, predicted)


def test_hand_formula_for_a_square_model():
  d, layers, t = 64, 3, 100
  config = bytelm_config(d, layers, 4, 4, 16, 4 * d)
  count = bytelm_flops(config, t, convention="spacebyte")
  # SpaceByte convention: 2 x (4D^2 QKVO + 2*3*... our SwiGLU has 3 matrices of D x 4D) + 2*2*T*D attention.
  expected = layers * (2 * 4 * d * d + 2 * 3 * d * 4 * d + 2 * 2 * t * d) + 2 * d * vocab.VOCAB_SIZE
  assert count.forward == pytest.approx(expected)
  assert count.training == pytest.approx(3 * expected)


def test_attended_keys_brute_force():
  for context, window in [(10, None), (10, 3), (7, 7), (9, 20)]:
    keys = [min(t + 1, window or t + 1) for t in range(context)]
    assert attended_keys(context, window=window, convention="exact", attention="causal") == pytest.approx(
        sum(keys) / context)


def test_unknown_config_raises():
  with pytest.raises(ValueError, match="no FLOP counter"):
    flops_per_byte(object(), 10)


def test_megabyte_count_matches_xla_forward():
  from bytescale.configs import TransformerConfig as TC
  from bytescale.models.megabyte import MegaByte, MegaByteConfig

  def stack(d, layers, heads):
    return TC(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
              mlp_hidden=3 * d, scan_layers=False)

  for patch_size, seq_len in [(4, 127), (8, 255)]:
    config = MegaByteConfig(global_stack=stack(32 * patch_size, 2, 4), local_stack=stack(64, 2, 4),
                            patch_size=patch_size, max_seq_len=256)
    model = MegaByte(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.zeros((2, seq_len), jnp.int32)
    measured = xla_flops(lambda p, x: nnx.merge(graphdef, p)(x).logits_BxTxV, params, ids) / ids.size
    predicted = flops_per_byte(config, seq_len, attention="dense").forward
    assert abs(measured / predicted - 1) < 0.05, (patch_size, measured, predicted)
