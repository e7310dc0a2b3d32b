"""RoPE context extension inside models: cached decoding across regime switches, traced factors, model configs.

The reference for decoding is always a plain full forward over exactly the tokens decoded so far (a full forward
at length n rotates with the regime of n), compared at the positions the decode step produced.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale.models import registry
from bytescale import configs
from bytescale.models import ByteLM
from bytescale.ops import rope
from bytescale.ops.rope import RopeConfig
from tests.conftest import assert_close, tiny_bytelm_config

# Tiny models: head_dim 8 -> 4 rotary pairs, so LongRoPE needs 4 factors per set; L = 16 tokens.
LENGTH = 16
LONGROPE = RopeConfig(rope_type="longrope", original_max_position_embeddings=LENGTH, factor=4.0, n_hat=3,
                      short_factor=(1.0, 1.1, 1.3, 1.6), long_factor=(1.0, 2.5, 6.0, 12.0))
DYNAMIC = RopeConfig(rope_type="dynamic", original_max_position_embeddings=LENGTH, factor=2.0)
# A progressive extension's sets: switches at 12 -> 13, 16 -> 17 and 24 -> 25, each with its own scale and n_hat.
SETS = RopeConfig(rope_type="longrope", original_max_position_embeddings=LENGTH, factor_sets=(
    (12, (1.0, 1.0, 1.1, 1.2), 1.0, 0), (16, (1.0, 1.2, 1.5, 2.0), 1.05, 2),
    (24, (1.0, 2.0, 4.0, 7.0), 1.2, 0), (28, (1.1, 3.0, 9.0, 20.0), 1.3, 4)))
TOTAL = 30
CHECKED_LENGTHS = (11, 16, 17, 18, 30)  # around the switch at 16 -> 17, and beyond


def build(rope_config, seed=3):
  model = ByteLM(tiny_bytelm_config(rope=rope_config), rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits_BxTxV)
  decode = jax.jit(lambda state, cache, ids: _decode(nnx.merge(graphdef, state), cache, ids))
  return model, state, forward, decode


def _decode(model, cache, ids):
  out, cache = model.decode(cache, ids)
  return out.logits_BxTxV, cache


_BUILT = {}


def built(name):
  """``(name, ids, model, state, forward, decode)`` of a rope type, built once: every test of that type shares the
  compiled forward (one compilation per length) and decode."""
  if name not in _BUILT:
    config = {"longrope": LONGROPE, "dynamic": DYNAMIC, "factor_sets": SETS}[name]
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(2, TOTAL)), jnp.int32)
    _BUILT[name] = (name, ids, *build(config))
  return _BUILT[name]


@pytest.fixture(scope="module", params=["longrope", "dynamic", "factor_sets"])
def setup(request):
  return built(request.param)


# The chunk, rollback and mixed-regime tests: plain LongRoPE (one switch) is slow only, factor_sets (three
# switches, the same mechanism) and dynamic run by default.
@pytest.fixture(scope="module", params=[pytest.param("longrope", marks=pytest.mark.slow), "dynamic", "factor_sets"])
def switching(request):
  return built(request.param)


def test_the_switch_changes_the_logits_so_the_decode_tests_can_fail(setup):
  """A full forward at 17 tokens scores the first 16 differently from one at 16: stale keys would show."""
  _, ids, model, state, forward, _ = setup
  at_16 = np.asarray(forward(state, ids[:, :16]))
  at_17 = np.asarray(forward(state, ids[:, :17]))[:, :16]
  assert np.abs(at_17 - at_16).max() > 1e-3


def test_token_by_token_decoding_equals_the_full_forward_at_every_length(setup):
  _, ids, model, state, forward, decode = setup
  cache = model.init_cache(2, 32)
  logits, cache = decode(state, cache, ids[:, :10])  # prefill in the short regime
  assert_close(logits, forward(state, ids[:, :10]), atol=2e-5, what="prefill")
  for n in range(11, TOTAL + 1):
    logits, cache = decode(state, cache, ids[:, n - 1:n])
    if n in CHECKED_LENGTHS:
      assert_close(logits[:, 0], forward(state, ids[:, :n])[:, -1], atol=2e-5, what=f"length {n}")
  assert np.asarray(cache.lengths_B).tolist() == [TOTAL, TOTAL]


def test_a_chunk_crossing_the_switch_equals_the_full_forward_at_its_end(switching):
  _, ids, model, state, forward, decode = switching
  cache = model.init_cache(2, 32)
  _, cache = decode(state, cache, ids[:, :12])
  logits, cache = decode(state, cache, ids[:, 12:21])  # 12 -> 21 crosses L = 16 inside the chunk
  assert_close(logits, forward(state, ids[:, :21])[:, 12:], atol=2e-5)


def test_rollback_back_below_the_switch_and_decoding_on(switching):
  _, ids, model, state, forward, decode = switching
  cache = model.init_cache(2, 32)
  _, cache = decode(state, cache, ids[:, :24])  # long regime
  cache = model.rollback(cache, jnp.array([10, 10]))  # 14 tokens left: short regime again
  for n in (15, 16, 17):
    logits, cache = decode(state, cache, ids[:, n - 1:n])
    assert_close(logits[:, 0], forward(state, ids[:, :n])[:, -1], atol=2e-5, what=f"length {n}")


def test_rows_at_lengths_in_different_regimes_each_match_their_own_forward(switching):
  """One row past the switch, one before it: each uses its own length's rotation in the same step."""
  _, ids, model, state, forward, decode = switching
  cache = model.init_cache(2, 32)
  _, cache = decode(state, cache, ids[:, :20])
  cache = model.rollback(cache, jnp.array([0, 8]))  # row 0 at 20 tokens, row 1 at 12
  step_ids = jnp.stack([ids[0, 20:21], ids[1, 12:13]])
  logits, cache = decode(state, cache, step_ids)
  assert_close(logits[0, 0], forward(state, ids[:1, :21])[0, -1], atol=2e-5, what="row 0 (long regime)")
  assert_close(logits[1, 0], forward(state, ids[1:, :13])[0, -1], atol=2e-5, what="row 1 (short regime)")


def test_each_length_reads_the_factor_set_serving_it_as_if_it_were_alone():
  """Logits at each length, full forward and token-by-token cached decoding, equal those of the same parameters
  configured with that set alone (a short/long config holding the set twice, with its scale and n_hat)."""
  ids = jnp.asarray(np.random.default_rng(6).integers(0, 256, size=(2, TOTAL)), jnp.int32)
  model, state, forward, decode = build(SETS, seed=7)
  alone = {}
  for entry in SETS.factor_sets:
    config = RopeConfig(rope_type="longrope", original_max_position_embeddings=LENGTH, short_factor=entry.factors,
                        long_factor=entry.factors, attention_factor=entry.attention_factor, n_hat=entry.n_hat)
    alone[entry.max_length] = build(config, seed=7)[2]  # same seed: the same parameters
  serving = lambda n: next((m for m in (12, 16, 24) if n <= m), 28)  # the sets' lengths, written out here
  cache = model.init_cache(2, 32)
  logits, cache = decode(state, cache, ids[:, :5])
  for n in range(6, TOTAL + 1):
    logits, cache = decode(state, cache, ids[:, n - 1:n])
    if n in (12, 13, 17, 30):  # the first set's end, and into each later set (the last: past its length)
      reference = alone[serving(n)](state, ids[:, :n])
      assert_close(forward(state, ids[:, :n]), reference, atol=2e-5, what=f"forward at {n}")
      assert_close(logits[:, 0], reference[:, -1], atol=2e-5, what=f"decode at {n}")
  # The sets differ where it shows: each length's logits differ from its neighbour set's.
  for n, other in ((13, 12), (30, 24)):
    assert np.abs(np.asarray(forward(state, ids[:, :n]) - alone[other](state, ids[:, :n]))).max() > 1e-3, n


def test_length_independent_extensions_keep_decoding_exactly():
  yarn = RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=LENGTH)
  model, state, forward, decode = build(yarn, seed=5)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(1, 24)), jnp.int32)
  cache = model.init_cache(1, 32)
  first, cache = decode(state, cache, ids[:, :15])
  second, cache = decode(state, cache, ids[:, 15:24])
  assert_close(jnp.concatenate([first, second], axis=1), forward(state, ids), atol=2e-5)


# --- Traced LongRoPE factors: one compile scores many candidates -----------------------------------------------


def test_traced_factors_rotate_like_a_config_holding_them_and_compile_once():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 2, 8))
  positions = jnp.asarray([[0, 1, 2, 5, 40, 3000]], jnp.int32)
  traces = []

  @jax.jit
  def rotate_with(long_factor, n_hat):
    traces.append(1)
    with rope.traced_longrope_factors(LONGROPE, long_factor=long_factor, n_hat=n_hat):
      return rope.rotate(x, positions, LONGROPE, seq_len=3001)

  for long_factor, n_hat in (((1.0, 2.0, 3.0, 4.0), 0), ((1.0, 1.0, 7.5, 30.0), 2), ((2.0, 2.0, 2.0, 2.0), 4)):
    static = dataclasses.replace(LONGROPE, long_factor=long_factor, n_hat=n_hat)  # host float64 tables
    traced = rotate_with(jnp.asarray(long_factor, jnp.float32), jnp.int32(n_hat))
    assert_close(traced, rope.rotate(x, positions, static, seq_len=3001), atol=2e-5, what=str(long_factor))
  assert len(traces) == 1
  # Outside the block the config's own factors are back.
  assert_close(rope.rotate(x, positions, LONGROPE, seq_len=3001),
               rope.rotate(x, positions, dataclasses.replace(LONGROPE), seq_len=3001), atol=0)


def test_traced_factors_must_have_one_entry_per_pair():
  with pytest.raises(ValueError, match=r"long_factor has shape \(3,\)"):
    with rope.traced_longrope_factors(LONGROPE, long_factor=jnp.ones(3)):
      rope.rotate(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), LONGROPE, seq_len=40)


# --- Model configs: which stack rotates with what -------------------------------------------------------------


def test_rope_paths_and_loading_an_hf_rope_scaling_file(tmp_path):
  model_config = dataclasses.replace(tiny_bytelm_config(), stack=dataclasses.replace(
      tiny_bytelm_config().stack, rope=RopeConfig(rope_theta=500.0)))
  assert rope.rope_paths(model_config) == ["stack.rope"]
  hf_config = {"rope_scaling": {"type": "longrope", "short_factor": [1, 1, 1, 1], "long_factor": [1, 2, 3, 4]},
               "max_position_embeddings": 128, "original_max_position_embeddings": 32, "vocab_size": 260}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(hf_config))
  loaded = rope.apply_rope_scaling(model_config, str(path)).stack.rope
  assert loaded.rope_type == "longrope" and loaded.long_factor == (1.0, 2.0, 3.0, 4.0)
  assert loaded.factor == 4.0 and loaded.original_max_position_embeddings == 32  # HF: 128 / 32
  assert loaded.rope_theta == 500.0  # the stack's trained base is kept
  bare = rope.apply_rope_scaling(model_config, '{"rope_type": "linear", "factor": 2}', ["stack"]).stack.rope
  assert (bare.rope_type, bare.factor, bare.rope_theta) == ("linear", 2.0, 500.0)
  with pytest.raises(ValueError, match="betta_fast"):
    rope.apply_rope_scaling(model_config, {"rope_type": "yarn", "factor": 2, "betta_fast": 3,
                                           "original_max_position_embeddings": 8})
  with pytest.raises(ValueError, match=r"names no RopeConfig.*\['stack.rope'\]"):
    rope.replace_rope(model_config, RopeConfig(), ["global_stack"])


def test_set_overrides_reach_the_rope_fields_by_bare_name():
  config = registry.get_preset("bytelm", "tiny")
  # Fields a method needs go first: each --set validates the config it produces.
  for key, value in (("original_max_position_embeddings", "256"), ("factor", "4"), ("rope_type", "yarn"),
                     ("stack.rope.beta_fast", "16")):
    config = configs.replace_path(config, key, value)
  assert config.stack.rope == RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=256,
                                         beta_fast=16.0)
