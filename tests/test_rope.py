"""RoPE context-extension family: every expected value here is an independent float64 closed form."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale.ops import rope
from bytescale.ops.rope import RopeConfig

# microsoft/Phi-3.5-mini-instruct config.json: head dim 3072/32 = 96, so 48 factors per set; rope_theta 10000,
# original_max_position_embeddings 4096, max_position_embeddings 131072, rope_scaling type "longrope".
PHI35_LONG_FACTOR = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
)
PHI35_SHORT_FACTOR = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
)
PHI35_BLOCK = {"long_factor": list(PHI35_LONG_FACTOR), "short_factor": list(PHI35_SHORT_FACTOR), "type": "longrope"}
LLAMA31_BLOCK = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def phi35_config(**overrides):
  return RopeConfig.from_hf(PHI35_BLOCK | overrides, rope_theta=10000.0, max_position_embeddings=131072,
                            original_max_position_embeddings=4096)


def base_frequencies(d, theta):
  return np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])


def wrapped(angle):
  return np.abs(np.angle(np.exp(1j * angle)))


def unit_pairs(num_positions, head_dim, dtype=np.float32):
  """x with every first-half feature 1 and second half 0: the rotation writes (s cos, s sin) into the pair."""
  x = np.zeros((1, num_positions, 1, head_dim), dtype)
  x[..., : head_dim // 2] = 1
  return jnp.asarray(x)


def rotation_angles(config, positions, head_dim, seq_len=None):
  y = np.asarray(rope.rotate(unit_pairs(positions.shape[1], head_dim), jnp.asarray(positions), config,
                             seq_len=seq_len), np.float64)[:, :, 0]
  half = head_dim // 2
  return np.arctan2(y[..., half:], y[..., :half]), np.hypot(y[..., half:], y[..., :half])


# --- Inverse frequencies and attention scale --------------------------------------------------------------


def test_default_linear_ntk_match_closed_forms():
  d, theta, s = 64, 10000.0, 4.0
  w = base_frequencies(d, theta)
  tables = lambda **kw: rope.rope_tables(RopeConfig(**kw), d)
  np.testing.assert_allclose(tables()[0], w, rtol=1e-14)
  np.testing.assert_allclose(tables(rope_type="linear", factor=s)[0], w / s, rtol=1e-14)
  ntk_base = theta * s ** (d / (d - 2))
  np.testing.assert_allclose(tables(rope_type="ntk", factor=s)[0], base_frequencies(d, ntk_base), rtol=1e-13)
  for kind in ("default", "linear", "ntk"):
    assert tables(rope_type=kind, factor=s if kind != "default" else 1.0)[1] == 1.0


def test_dynamic_follows_hf_formula_and_reduces_to_plain_ratio_with_factor_1():
  d, theta, length = 64, 10000.0, 2048
  w = base_frequencies(d, theta)
  hf = RopeConfig(rope_type="dynamic", factor=2.0, original_max_position_embeddings=length)
  for n in (100, length, 3 * length):
    scale = 2.0 * max(n, length) / length - 1.0  # HF: s*n/L - (s-1)
    expected = base_frequencies(d, theta * scale ** (d / (d - 2)))
    np.testing.assert_allclose(rope.rope_tables(hf, d, n)[0], expected, rtol=1e-13)
  np.testing.assert_allclose(rope.rope_tables(hf, d, length)[0], w, rtol=1e-14)  # no scaling up to L
  plain = RopeConfig(rope_type="dynamic", factor=1.0, original_max_position_embeddings=length)
  n = 5000  # the notes' formula: s = max(1, len/L)
  np.testing.assert_allclose(rope.rope_tables(plain, d, n)[0],
                             base_frequencies(d, theta * (n / length) ** (d / (d - 2))), rtol=1e-13)


def yarn_reference(d, theta, s, length, beta_fast=32.0, beta_slow=1.0, truncate=True):
  index = lambda rotations: d * math.log(length / (2 * math.pi * rotations)) / (2 * math.log(theta))
  lo, hi = index(beta_fast), index(beta_slow)
  if truncate:
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, d - 1)
  w = base_frequencies(d, theta)
  out = []
  for i in range(d // 2):
    ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
    out.append((1 - ramp) * w[i] + ramp * w[i] / s)
  return np.array(out), (lo, hi)


@pytest.mark.parametrize(
    "d,theta,s,length,truncate",
    [(128, 10000.0, 8.0, 4096, True), (64, 10000.0, 4.0, 128, True), (64, 150000.0, 32.0, 4096, False)],
)
def test_yarn_uses_the_codes_ramp(d, theta, s, length, truncate):
  config = RopeConfig(rope_type="yarn", rope_theta=theta, factor=s, original_max_position_embeddings=length,
                      truncate=truncate)
  expected, (lo, hi) = yarn_reference(d, theta, s, length, truncate=truncate)
  inv_freq, scale = rope.rope_tables(config, d)
  np.testing.assert_allclose(inv_freq, expected, rtol=1e-13)
  w = base_frequencies(d, theta)
  assert inv_freq[0] == pytest.approx(w[0]) and inv_freq[-1] == pytest.approx(w[-1] / s)  # ends untouched/scaled
  if length == 128:
    assert lo == 0  # the clamp at 0 is what the code does (the unclamped index is negative here)
  assert scale == pytest.approx(0.1 * math.log(s) + 1.0, rel=1e-15)


def test_yarn_attention_factor_variants():
  common = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096)
  m, m_all = 1.0, 0.707
  expected = (0.1 * m * math.log(40) + 1) / (0.1 * m_all * math.log(40) + 1)
  assert rope.attention_scale(RopeConfig(**common, mscale=m, mscale_all_dim=m_all)) == pytest.approx(expected)
  assert rope.attention_scale(RopeConfig(**common, mscale=m)) == pytest.approx(0.1 * math.log(40) + 1)  # HF: needs both
  assert rope.attention_scale(RopeConfig(**common, attention_factor=1.25)) == 1.25


def test_llama3_blend_matches_closed_form():
  d, theta, s, length, low, high = 128, 500000.0, 8.0, 8192, 1.0, 4.0
  config = RopeConfig.from_hf(LLAMA31_BLOCK, rope_theta=theta, max_position_embeddings=131072)
  w = base_frequencies(d, theta)
  expected, regions = [], set()
  for wi in w:
    wavelength = 2 * math.pi / wi
    if wavelength < length / high:
      expected.append(wi), regions.add("kept")
    elif wavelength > length / low:
      expected.append(wi / s), regions.add("scaled")
    else:
      sigma = (length / wavelength - low) / (high - low)
      expected.append((1 - sigma) * wi / s + sigma * wi), regions.add("blended")
  assert regions == {"kept", "scaled", "blended"}
  inv_freq, scale = rope.rope_tables(config, d)
  np.testing.assert_allclose(inv_freq, expected, rtol=1e-13)
  assert scale == 1.0


def test_longrope_phi35_short_long_switch_and_attention_factor():
  config = phi35_config()
  d = 96
  w = base_frequencies(d, 10000.0)
  short, scale = rope.rope_tables(config, d, 4096)
  long, _ = rope.rope_tables(config, d, 4097)
  np.testing.assert_allclose(short, w / np.array(PHI35_SHORT_FACTOR), rtol=1e-14)
  np.testing.assert_allclose(long, w / np.array(PHI35_LONG_FACTOR), rtol=1e-14)
  assert scale == pytest.approx(math.sqrt(1 + math.log(131072 / 4096) / math.log(4096)), rel=1e-15)
  # The rotation itself switches at L: same positions, different angles once the length passes 4096.
  positions = np.array([[0, 1, 17, 1000, 4095]], np.int32)
  for seq_len, frequencies in ((4096, short), (4097, long), (None, short)):
    angles, norms = rotation_angles(config, positions, d, seq_len)
    np.testing.assert_allclose(wrapped(angles - positions[..., None] * frequencies).max(), 0, atol=2e-6)
    np.testing.assert_allclose(norms, scale, rtol=1e-6)
  long_positions = np.array([[0, 5000]], np.int32)  # seq_len=None -> max+1 = 5001 > 4096: long
  angles, _ = rotation_angles(config, long_positions, d)
  assert wrapped(angles - long_positions[..., None] * long).max() < 2e-6


def test_longrope_n_hat_leaves_leading_positions_unscaled():
  config = phi35_config(n_hat=4)
  d, w = 96, base_frequencies(96, 10000.0)
  positions = np.array([[0, 3, 4, 9000]], np.int32)
  angles, _ = rotation_angles(config, positions, d, seq_len=9001)
  expected = np.where(positions[..., None] < 4, positions[..., None] * w,
                      positions[..., None] * w / np.array(PHI35_LONG_FACTOR))
  assert wrapped(angles - expected).max() < 2e-6


# --- Rotation properties ----------------------------------------------------------------------------------


def test_rotation_preserves_norms_scaled_by_attention_factor_and_passes_partial_features():
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (2, 5, 3, 32))
  positions = jnp.asarray(np.arange(10).reshape(2, 5) * 997, jnp.int32)
  norm = lambda a: np.linalg.norm(np.asarray(a, np.float64), axis=-1)
  np.testing.assert_allclose(norm(rope.rotate(x, positions, RopeConfig())), norm(x), rtol=1e-5)
  yarn = RopeConfig(rope_type="yarn", factor=16.0, original_max_position_embeddings=1024)
  np.testing.assert_allclose(norm(rope.rotate(x, positions, yarn)), norm(x) * (0.1 * math.log(16) + 1), rtol=1e-5)
  partial = RopeConfig(partial_rotary_factor=0.5)
  y = rope.rotate(x, positions, partial)
  np.testing.assert_array_equal(np.asarray(y[..., 16:]), np.asarray(x[..., 16:]))
  np.testing.assert_allclose(norm(y[..., :16]), norm(x[..., :16]), rtol=1e-5)
  assert rope.rotate(x.astype(jnp.bfloat16), positions, RopeConfig()).dtype == jnp.bfloat16


def test_dot_product_depends_only_on_relative_position_even_at_two_million():
  q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, 64))
  offsets = np.array([0, 1000, 2**21, 2**21 + 777], np.int64)
  m, n = 37, 5
  scores = []
  for offset in offsets:
    rq = rope.rotate(q, jnp.asarray([[m + offset]], jnp.int32), RopeConfig())
    rk = rope.rotate(k, jnp.asarray([[n + offset]], jnp.int32), RopeConfig())
    scores.append(float(jnp.sum(rq * rk)))
  np.testing.assert_allclose(scores, scores[0], atol=2e-5)


def test_phase_error_at_two_to_the_21_is_far_below_naive_float32():
  d = 128
  w = base_frequencies(d, 10000.0)
  positions = (2**21 + np.arange(-256, 256))[None].astype(np.int32)
  reference = positions[..., None].astype(np.float64) * w  # float64, exact enough here (~1e-10 rad)
  angles, _ = rotation_angles(RopeConfig(), positions, d)
  ours = wrapped(angles - reference).max()
  naive = wrapped((positions[..., None].astype(np.float32) * w.astype(np.float32)).astype(np.float64)
                  - reference).max()
  bound = 2e-6  # measured ~4e-7 rad (including the atan2 read-back); naive float32 is ~0.1 rad
  assert ours < bound
  assert naive > 1000 * bound  # the test can fail: the naive product blows through the bound
  far = np.array([[2**24 + 3, 2**30 + 12345, 2**31 - 1]], np.int32)  # and it holds for any int32 position
  far_angles, _ = rotation_angles(RopeConfig(), far, d)
  assert wrapped(far_angles - np.mod(far[..., None].astype(np.float64) * w, 2 * np.pi)).max() < bound


def test_apply_rope_and_rope_angles_keep_working_for_host_and_traced_frequencies():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 2, 16))
  positions = jnp.asarray([[0, 1, 2, 100000]], jnp.int32)
  inv_freq = rope.default_inverse_frequencies(16, 10000.0)
  expected = rope.rotate(x, positions, RopeConfig())
  np.testing.assert_allclose(rope.apply_rope(x, positions, inv_freq), expected, atol=1e-6)
  # Traced frequencies are float32 numbers; the rotation is exact for those numbers.
  inv_freq_f32 = inv_freq.astype(np.float32)
  traced = jax.jit(lambda f: rope.apply_rope(x, positions, f))(jnp.asarray(inv_freq_f32))
  np.testing.assert_allclose(traced, rope.apply_rope(x, positions, inv_freq_f32.astype(np.float64)), atol=1e-6)
  np.testing.assert_allclose(np.cos(rope.rope_angles(positions, inv_freq)),
                             np.cos(np.asarray(positions, np.float64)[..., None] * inv_freq), atol=1e-6)


# --- Configuration ----------------------------------------------------------------------------------------


def test_from_hf_loads_llama31_and_phi35_blocks():
  llama = RopeConfig.from_hf(LLAMA31_BLOCK, rope_theta=500000.0, max_position_embeddings=131072)
  assert (llama.rope_type, llama.factor, llama.low_freq_factor, llama.high_freq_factor) == ("llama3", 8.0, 1.0, 4.0)
  assert llama.original_max_position_embeddings == 8192 and llama.rope_theta == 500000.0
  phi = phi35_config()
  assert phi.rope_type == "longrope" and phi.original_max_position_embeddings == 4096
  assert phi.factor == 32.0  # HF: max_position_embeddings / original_max_position_embeddings
  assert phi.short_factor == PHI35_SHORT_FACTOR and phi.long_factor == PHI35_LONG_FACTOR
  deepseek = RopeConfig.from_hf(
      {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
       "original_max_position_embeddings": 4096}, rope_theta=10000.0, max_position_embeddings=163840)
  assert deepseek.factor == 40.0 and rope.attention_scale(deepseek) == 1.0
  assert RopeConfig.from_hf(None, rope_theta=500000.0) == RopeConfig(rope_theta=500000.0)
  dynamic = RopeConfig.from_hf({"type": "dynamic", "factor": 2.0}, max_position_embeddings=4096)
  assert dynamic.original_max_position_embeddings == 4096
  hash(phi)  # hashable: usable as a static jit argument


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: RopeConfig.from_hf({"rope_type": "yarn", "factor": 4.0, "betta_fast": 8}, 10000.0, 4096),
         "betta_fast"),
        (lambda: RopeConfig.from_hf({"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}, 10000.0, 4096),
         "low_freq_factor"),
        (lambda: RopeConfig.from_hf({"rope_type": "su-ish"}), "rope_type"),
        (lambda: RopeConfig.from_hf({"type": "linear", "rope_type": "yarn", "factor": 2.0}), "type"),
        (lambda: RopeConfig(rope_type="rotary"), "rope_type"),
        (lambda: RopeConfig(rope_type="linear", factor=0.5), "factor"),
        (lambda: RopeConfig(rope_theta=float("nan")), "rope_theta"),
        (lambda: RopeConfig(rope_type="yarn", factor=float("inf"), original_max_position_embeddings=4096), "factor"),
        (lambda: RopeConfig(rope_type="yarn", factor=4.0), "original_max_position_embeddings"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8, short_factor=(1.0,)),
         "long_factor"),
        (lambda: phi35_config(short_factor=[1.0] * 47 + [float("nan")]), "short_factor[47]"),
        (lambda: RopeConfig(rope_type="llama3", factor=8.0, original_max_position_embeddings=8192,
                            low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
        (lambda: RopeConfig(rope_type="linear", factor=2.0, attention_factor=1.1), "attention_factor"),
        (lambda: RopeConfig(n_hat=-1), "n_hat"),
        (lambda: RopeConfig(partial_rotary_factor=1.5), "partial_rotary_factor"),
    ],
)
def test_bad_configs_raise_naming_the_field(make, field):
  with pytest.raises(ValueError, match=rf"\b{field.replace('[', '.').replace(']', '.')}"):
    make()


def test_factor_array_length_is_checked_against_the_head_dim():
  config = phi35_config()  # 48 factors: right for head dim 96
  with pytest.raises(ValueError, match=r"short_factor.*48 entries.*needs 32"):
    rope.rotate(jnp.zeros((1, 2, 1, 64)), jnp.zeros((1, 2), jnp.int32), config)
  with pytest.raises(ValueError, match="short_factor"):
    rope.rope_tables(config, 64)


# --- Length dependence: jit and KV caches -----------------------------------------------------------------


def test_jit_with_traced_seq_len_matches_static_lengths():
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 3, 2, 96))
  positions = jnp.asarray([[0, 2000, 4000]], jnp.int32)
  dynamic = RopeConfig(rope_type="dynamic", factor=2.0, original_max_position_embeddings=4096)
  for config, tolerance in ((phi35_config(), 2e-6), (dynamic, 1e-4)):  # measured 8e-7, 3e-5
    rotate = jax.jit(lambda x, p, n, config=config: rope.rotate(x, p, config, seq_len=n))
    for seq_len in (4096, 4097, 9000):
      traced = rotate(x, positions, jnp.int32(seq_len))
      np.testing.assert_allclose(traced, rope.rotate(x, positions, config, seq_len=seq_len), atol=tolerance)
      regime = jax.jit(lambda n, config=config: rope.rotation_regime(config, n))(jnp.int32(seq_len))
      assert int(regime) == int(rope.rotation_regime(config, seq_len))


def test_kv_cache_crossing_the_longrope_switch_rerotates_to_the_full_forward():
  config = phi35_config()
  keys = jax.random.normal(jax.random.PRNGKey(4), (1, 6, 2, 96))
  positions = jnp.asarray([[0, 1, 2, 1000, 4000, 4095]], jnp.int32)
  # Prefill: 4096 tokens, short factors. Lengths inside one regime rotate identically.
  cached = rope.rotate(keys, positions, config, seq_len=4096)
  assert int(rope.rotation_regime(config, 4000)) == int(rope.rotation_regime(config, 4096)) == 0
  np.testing.assert_array_equal(cached, rope.rotate(keys, positions, config, seq_len=4000))
  # Decoding token 4097 crosses L: the regime changes and the cached keys are stale ...
  assert int(rope.rotation_regime(config, 4097)) == 1
  full_forward = rope.rotate(keys, positions, config, seq_len=4097)
  assert np.abs(np.asarray(cached - full_forward)).max() > 0.1
  # ... until they are re-rotated, which reproduces what a full forward at the final length uses.
  refreshed = rope.rerotate(cached, positions, config, from_seq_len=4096, to_seq_len=4097)
  np.testing.assert_allclose(refreshed, full_forward, atol=5e-6)
  assert int(rope.rotation_regime(RopeConfig(), 10**6)) == 0  # length-independent methods never go stale


# --- LongRoPE factor sets (progressive extension) -------------------------------------------------------------

# Four sets over L = 64, as a progressive extension writes them: two short re-searched sets, then two stage sets.
SET_LENGTH = 64
SETS = (
    {"max_length": 64, "factors": [1.0, 1.0, 1.1, 1.2]},  # attention_factor default: s = 1 -> 1
    {"max_length": 128, "factors": [1.0, 1.3, 1.8, 2.4], "n_hat": 3},  # default: s = 2
    {"max_length": 1024, "factors": [1.1, 2.5, 9.0, 16.0], "attention_factor": 1.25, "n_hat": 8},
    {"max_length": 4096, "factors": [1.2, 4.0, 30.0, 64.0]},  # serves every longer length too
)


def sets_config():
  return RopeConfig(rope_type="longrope", original_max_position_embeddings=SET_LENGTH, factor_sets=SETS)


def serving(seq_len):
  """The set of SETS a current length reads (first max_length >= seq_len, else the last), written out here."""
  for entry in SETS:
    if seq_len <= entry["max_length"]:
      return entry
  return SETS[-1]


def expected_scale(entry):
  s = entry["max_length"] / SET_LENGTH
  return entry.get("attention_factor", 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(SET_LENGTH)))


def test_factor_sets_rotate_each_length_with_its_own_set_scale_and_n_hat():
  config, d = sets_config(), 8
  w = base_frequencies(d, 10000.0)
  positions = np.array([[0, 2, 3, 7, 8, 63, 100, 127, 1000, 5000]], np.int32)
  rotate = jax.jit(lambda x, p, n: rope.rotate(x, p, config, seq_len=n))
  for seq_len in (1, 64, 65, 128, 129, 1024, 1025, 4096, 9000):
    entry = serving(seq_len)
    unscaled = positions[..., None] < entry.get("n_hat", 0)
    expected = positions[..., None] * np.where(unscaled, w, w / np.array(entry["factors"]))
    angles, norms = rotation_angles(config, positions, d, seq_len)
    assert wrapped(angles - expected).max() < 2e-6, seq_len
    np.testing.assert_allclose(norms, expected_scale(entry), rtol=1e-6, err_msg=str(seq_len))
    traced = rotate(unit_pairs(positions.shape[1], d), jnp.asarray(positions), jnp.int32(seq_len))
    static = rope.rotate(unit_pairs(positions.shape[1], d), jnp.asarray(positions), config, seq_len=seq_len)
    np.testing.assert_allclose(traced, static, atol=2e-6, err_msg=str(seq_len))
    inv_freq, scale = rope.rope_tables(config, d, seq_len)
    np.testing.assert_allclose(inv_freq, w / np.array(entry["factors"]), rtol=1e-14)
    assert scale == pytest.approx(expected_scale(entry), rel=1e-15)
  lengths = jnp.asarray([1, 64, 65, 128, 129, 4096, 4097, 10**6], jnp.int32)
  expected_regime = [0, 0, 1, 1, 2, 3, 3, 3]
  assert np.asarray(rope.rotation_regime(config, lengths)).tolist() == expected_regime
  assert np.asarray(jax.jit(lambda n: rope.rotation_regime(config, n))(lengths)).tolist() == expected_regime


def test_the_short_long_pair_is_the_two_set_case():
  phi = phi35_config(n_hat=2)
  scale = rope.attention_scale(phi)
  as_sets = RopeConfig(rope_type="longrope", original_max_position_embeddings=4096, factor_sets=(
      (4096, PHI35_SHORT_FACTOR, scale, 2), (131072, PHI35_LONG_FACTOR, scale, 2)))
  x = jax.random.normal(jax.random.PRNGKey(7), (1, 4, 2, 96))
  positions = jnp.asarray([[0, 1, 4000, 4096]], jnp.int32)
  for seq_len in (4096, 4097, 200000):
    np.testing.assert_array_equal(rope.rotate(x, positions, as_sets, seq_len=seq_len),
                                  rope.rotate(x, positions, phi, seq_len=seq_len))
    assert int(rope.rotation_regime(as_sets, seq_len)) == int(rope.rotation_regime(phi, seq_len))


def test_rerotate_between_sets_maps_angles_and_scales():
  config = sets_config()
  keys = jax.random.normal(jax.random.PRNGKey(8), (1, 5, 2, 8))
  positions = jnp.asarray([[0, 2, 9, 60, 127]], jnp.int32)
  for old, new in ((128, 129), (129, 128), (64, 1025), (5000, 65)):  # scales differ on each of these switches
    cached = rope.rotate(keys, positions, config, seq_len=old)
    refreshed = rope.rerotate(cached, positions, config, from_seq_len=old, to_seq_len=new)
    np.testing.assert_allclose(refreshed, rope.rotate(keys, positions, config, seq_len=new), atol=5e-6,
                               err_msg=f"{old} -> {new}")


def test_factor_sets_load_from_a_rope_scaling_block_and_survive_the_checkpoint_meta():
  from bytescale import configs

  block = {"rope_type": "longrope", "original_max_position_embeddings": SET_LENGTH, "factor_sets": list(SETS)}
  loaded = RopeConfig.from_hf(block, rope_theta=10000.0, max_position_embeddings=4096)
  assert loaded == sets_config() and loaded.factor == 1.0  # no factor derived from max_position_embeddings
  assert [s.max_length for s in loaded.factor_sets] == [64, 128, 1024, 4096]
  assert [s.n_hat for s in loaded.factor_sets] == [0, 3, 8, 0]
  assert loaded.factor_sets[1].attention_factor == pytest.approx(math.sqrt(1 + math.log(2) / math.log(64)))
  import json

  again = configs.from_dict(json.loads(json.dumps(configs.to_dict(loaded))))  # what checkpoint meta does
  assert again == loaded and hash(again) == hash(loaded)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: RopeConfig(rope_type="yarn", factor=2.0, original_max_position_embeddings=8,
                            factor_sets=((8, (1.0,)),)), "factor_sets"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8,
                            factor_sets=((16, (1.0, 2.0)), (16, (1.0, 3.0)))), "factor_sets[1].max_length"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8,
                            factor_sets=((16, (1.0, 2.0)), (32, (1.0,)))), "factor_sets[1].factors"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8,
                            factor_sets=({"max_length": 16, "factor": [1.0]},)), "factor_sets[0]"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8,
                            factor_sets=((16, (1.0, -2.0)),)), "factor_sets[0].factors[1]"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8, short_factor=(1.0,),
                            factor_sets=((16, (1.0,)),)), "short_factor"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8, factor=4.0,
                            factor_sets=((16, (1.0,)),)), "factor"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8, n_hat=2,
                            factor_sets=((16, (1.0,)),)), "n_hat"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8,
                            factor_sets=((16, (1.0,), 1.0, -1),)), "factor_sets[0].n_hat"),
        (lambda: RopeConfig(rope_type="longrope", original_max_position_embeddings=8, factor_sets=()),
         "factor_sets"),
    ],
)
def test_bad_factor_sets_raise_naming_the_field(make, field):
  with pytest.raises(ValueError, match=rf"RopeConfig\.{re.escape(field)}:"):
    make()


def test_factor_set_lengths_are_checked_against_the_head_dim():
  with pytest.raises(ValueError, match=r"factor_sets\[0\]\.factors: has 4 entries.*needs 8"):
    rope.rotate(jnp.zeros((1, 2, 1, 16)), jnp.zeros((1, 2), jnp.int32), sets_config())
