"""Multi-token heads: targets, loss against a float64 reference, memory-efficient gradients and memory, configs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale.models.registry import build_model
from bytescale.models import registry
from bytescale import configs, vocab
from bytescale.configs import ConfigError
from bytescale.data.pipeline import frame_documents, pack_rows
from bytescale.models.mtp import MultiTokenConfig, head_targets, multi_token_loss
from bytescale.models import ByteLM
from tests.conftest import assert_close, tiny_bytelm_config

VARIANTS = ["parallel", "sequential"]


def packed_batch(rng, seq_len=24, rows=3):
  """Rows cut from a stream of short documents: several documents per row, a padded last row."""
  docs = [bytes(rng.integers(0, 256, size=int(rng.integers(3, 11)), dtype=np.uint8)) for _ in range(9)]
  stream = frame_documents(docs)
  count = -(-(len(stream) - 1) // seq_len)
  picked = [pack_rows(stream, seq_len, i) for i in (0, 1, count - 1)][:rows]
  return {k: jnp.asarray(np.stack([r[k] for r in picked])) for k in ("inputs", "targets", "segment_ids", "loss_mask")}


def build(variant="parallel", n=3, trunk=None, seed=0, **fields):
  config = MultiTokenConfig(trunk=trunk or tiny_bytelm_config(), mtp_heads=n, mtp_variant=variant, **fields)
  return build_model(config, seed=seed)


class Jitted:
  """A model and jitted functions of its parameters (eager NNX calls are slow; each is compiled once)."""

  def __init__(self, model):
    self.model = model
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    merge = lambda p: nnx.merge(self.graphdef, p, self.rest)  # noqa: E731
    self.merge = merge
    self.all_logits = jax.jit(lambda p, ids, seg: merge(p).all_head_logits(ids, seg))
    self.next_logits = jax.jit(lambda p, ids, seg: merge(p)(ids, seg).logits_BxTxV)
    # ((loss, aux), grads); one compilation per setting serves both the loss and the gradient tests.
    self.value_and_grad = jax.jit(jax.value_and_grad(
        lambda p, batch, efficient: multi_token_loss(merge(p), batch, memory_efficient=efficient), has_aux=True),
        static_argnums=2)


WEIGHTS = (1.0, 0.5, 0.25)


@pytest.fixture(scope="module", params=VARIANTS)
def jitted(request):
  return Jitted(build(request.param, 3, mtp_loss_weights=WEIGHTS))


def test_head_targets_match_brute_force(rng):
  batch = packed_batch(rng)
  n = 4
  targets, masks = (np.asarray(a) for a in head_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], n))
  inputs, seg = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
  b, t = inputs.shape
  for row in range(b):
    # The row's token stream: inputs then the last target; byte t+i+1 of the stream is head i's target at t.
    stream = list(inputs[row]) + [int(batch["targets"][row, -1])]
    for i in range(n):
      for pos in range(t):
        target_pos = pos + i + 1
        valid = (target_pos <= t and seg[row, pos] != 0 and float(batch["loss_mask"][row, target_pos - 1]) == 1.0
                 and all(seg[row, q] == seg[row, pos] for q in range(pos, target_pos)))
        # A BOS between pos and the target would open a new document: never predicted across.
        valid = valid and vocab.BOS not in stream[pos + 1:target_pos + 1]
        assert masks[i, row, pos] == float(valid), (row, i, pos)
        if valid:
          assert targets[i, row, pos] == stream[target_pos]
  assert masks[1:].sum() > 0 and masks[-1].sum() < masks[0].sum()


def reference_loss(logits_NxBxTxV, batch, n, weights):
  """Float64 weighted per-head cross-entropy with masks built by a plain loop (no head_targets)."""
  logits = np.asarray(logits_NxBxTxV, np.float64)
  inputs, seg = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
  targets, mask = np.asarray(batch["targets"]), np.asarray(batch["loss_mask"])
  b, t = inputs.shape
  total, bpb = 0.0, []
  for i in range(n):
    nll, count = 0.0, 0
    for row in range(b):
      for pos in range(t - i):
        if seg[row, pos] == 0 or seg[row, pos + i] != seg[row, pos] or mask[row, pos + i] == 0:
          continue
        z = logits[i, row, pos]
        nll += np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[targets[row, pos + i]]
        count += 1
    total += weights[i] * nll / max(count, 1)
    bpb.append(nll / max(count, 1) / np.log(2))
  return total, bpb


def test_loss_equals_float64_reference(jitted, rng):
  batch = packed_batch(rng)
  # Teacher forcing: the sequential heads read the true next bytes (inputs shifted), as in all_head_logits.
  logits = jitted.all_logits(jitted.params, batch["inputs"], batch["segment_ids"])
  expected, expected_bpb = reference_loss(logits, batch, 3, WEIGHTS)
  for efficient in (True, False):
    (loss, aux), _ = jitted.value_and_grad(jitted.params, batch, efficient)
    assert_close(loss, expected, atol=2e-4, rtol=1e-5, what=f"efficient={efficient}")
    for i in range(3):
      assert_close(aux[f"bpb_head{i + 1}"], expected_bpb[i], atol=1e-4, what=f"head {i + 1}")
  # Head 1 is the protocol's next-byte model.
  assert_close(jitted.next_logits(jitted.params, batch["inputs"], batch["segment_ids"]), logits[0], atol=1e-5)


def test_heads_are_one_block_each_over_the_trunk(jitted, rng):
  """Head i's logits = trunk.unembed(Block_i(input_i)), composed here by hand from the parameters: input_i is the
  trunk output (parallel), or for i > 1 the projection of [RMSNorm(previous head); RMSNorm(embed(byte t+i-1))]."""

  @jax.jit
  def by_hand(params, ids):
    model = jitted.merge(params)
    hidden = model.trunk(ids).hidden_BxTxD
    graphdef, state = nnx.split(model.heads)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, previous = [], hidden
    for i in range(3):
      x = hidden
      if model.sequential and i > 0:
        combine = nnx.merge(*nnx.split(model.combine))
        w = combine.proj[i - 1]
        ahead = jnp.concatenate([ids[:, i:], jnp.full((ids.shape[0], i), vocab.PAD)], axis=1)
        normed = lambda x, scale: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * scale  # noqa: E731
        e = model.trunk.embed.table[...][ahead]
        x = jnp.concatenate([normed(previous, combine.hidden_norm.scale[i - 1]),
                             normed(e, combine.embed_norm.scale[i - 1])], -1) @ w
      previous = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(x, positions, jnp.ones_like(ids))
      logits.append(model.trunk.unembed(previous))
    return jnp.stack(logits)

  ids = jnp.asarray(rng.integers(0, 256, size=(3, 24)), jnp.int32)
  assert_close(jitted.all_logits(jitted.params, ids, jnp.ones_like(ids)), by_hand(jitted.params, ids), atol=1e-5)


def test_heads_never_see_other_documents(jitted, rng):
  a, b = rng.integers(0, 256, size=7), rng.integers(0, 256, size=9)
  ids = np.zeros((3, 24), np.int32)
  seg = np.zeros((3, 24), np.int32)
  ids[0, :16], seg[0, :16] = np.concatenate([a, b]), [1] * 7 + [2] * 9  # packed
  ids[1, :7], seg[1, :7] = a, 1  # alone (the rest is padding, segment 0)
  ids[2, :9], seg[2, :9] = b, 1
  logits = np.asarray(jitted.all_logits(jitted.params, jnp.asarray(ids), jnp.asarray(seg)))
  sequential = jitted.model.sequential
  for i in range(3):
    # Sequential heads read i bytes ahead (teacher forcing); compare where the read-ahead stays in the document.
    keep_a, keep_b = (7 - i, 9 - i) if sequential else (7, 9)
    assert_close(logits[i, 0, :keep_a], logits[i, 1, :keep_a], atol=2e-5, what=f"head {i + 1}, document a")
    assert_close(logits[i, 0, 7:7 + keep_b], logits[i, 2, :keep_b], atol=2e-5, what=f"head {i + 1}, document b")


def test_memory_efficient_gradients_equal_naive(jitted, rng):
  batch = packed_batch(rng)
  efficient, naive = (jitted.value_and_grad(jitted.params, batch, e)[1] for e in (True, False))
  assert all(float(jnp.max(jnp.abs(b))) > 0 for b in jax.tree.leaves(naive))  # every parameter, every head
  chex.assert_trees_all_close(efficient, naive, atol=2e-6, rtol=1e-4)


def temp_bytes(n, efficient, batch):
  config = MultiTokenConfig(trunk=tiny_bytelm_config(), mtp_heads=n)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config, seed=0)), nnx.Param)
  grad = jax.grad(lambda p, b: multi_token_loss(nnx.merge(graphdef, p), b, memory_efficient=efficient)[0])
  return jax.jit(grad).lower(params, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_memory_efficient_loss_is_flat_in_heads():
  b, t = 2, 128
  ids = jnp.zeros((b, t), jnp.int32)
  batch = {"inputs": ids, "targets": ids, "segment_ids": jnp.ones_like(ids), "loss_mask": jnp.ones((b, t))}
  logits_bytes = b * t * vocab.VOCAB_SIZE * 4
  one, efficient, naive = temp_bytes(1, True, batch), temp_bytes(4, True, batch), temp_bytes(4, False, batch)
  # The naive step keeps every head's activations and logits for the backward pass: it grows by more than a
  # head's logits per head; the scan with remat keeps none of them.
  assert naive - one > 3 * logits_bytes
  assert efficient - one < 0.5 * logits_bytes


def test_parameter_matched_removes_trunk_layers():
  trunk = tiny_bytelm_config(num_layers=4)
  count = lambda make: sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))  # noqa: E731
  base = count(lambda: ByteLM(trunk, rngs=nnx.Rngs(0)))
  matched = nnx.eval_shape(lambda: build("parallel", 2, trunk=trunk, mtp_parameter_matched=True))
  assert matched.trunk.config.stack.num_layers == 2
  assert count(lambda: build("parallel", 2, trunk=trunk, mtp_parameter_matched=True)) == base  # 2 + 2 = 4 layers
  d = trunk.stack.d_model
  sequential = count(lambda: build("sequential", 3, trunk=trunk, mtp_parameter_matched=True))
  assert sequential == base + 2 * (2 * d + 2 * d * d)  # + the two DeepSeek projections and norms
  with pytest.raises(ConfigError, match="mtp_parameter_matched"):
    MultiTokenConfig(trunk=trunk, mtp_heads=4, mtp_parameter_matched=True)


def test_config_validation_round_trip_and_flops():
  with pytest.raises(ConfigError, match="mtp_heads"):
    MultiTokenConfig(mtp_heads=0)
  with pytest.raises(ConfigError, match="mtp_variant"):
    MultiTokenConfig(mtp_variant="tree")
  with pytest.raises(ConfigError, match="mtp_loss_weights.*one weight per head"):
    MultiTokenConfig(mtp_heads=2, mtp_loss_weights=(1.0,))
  with pytest.raises(ConfigError, match="mtp_loss_weights"):
    MultiTokenConfig(mtp_heads=2, mtp_loss_weights=(0.0, 1.0))
  config = MultiTokenConfig(trunk=tiny_bytelm_config(), mtp_heads=3, mtp_variant="sequential",
                            mtp_loss_weights=[1, 0.5, 0.5])
  assert config.mtp_loss_weights == (1.0, 0.5, 0.5)
  assert registry.config_from_dict(configs.to_dict(config)) == config
  assert MultiTokenConfig(mtp_heads=3, mtp_variant="sequential").loss_weights == (1.0, 0.15, 0.15)
  assert MultiTokenConfig(mtp_heads=3).loss_weights == (1.0, 1.0, 1.0)

  # Forward FLOPs per byte counted by hand over 64 bytes: every head is one block of the trunk's shape (Q, K, V, O
  # projections, causal attention over (64 + 1) / 2 keys on average, a SwiGLU of three matrices) with its own
  # unembedding; sequential heads 2..n add a (2d x d) projection each. Norms and embedding lookups are free.
  s = config.trunk.stack
  d, layers, n, t = s.d_model, s.num_layers, 3, 64
  block = (2 * d * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads) + 2 * 2 * s.num_heads * s.head_dim * (t + 1) / 2
           + 2 * 3 * d * s.mlp_hidden)
  unembed = 2 * d * vocab.VOCAB_SIZE
  parallel = MultiTokenConfig(trunk=config.trunk, mtp_heads=n)
  assert registry.flops_per_byte(parallel, t).forward == pytest.approx((layers + n) * block + n * unembed)
  assert registry.flops_per_byte(config, t).forward == pytest.approx(
      (layers + n) * block + n * unembed + (n - 1) * 2 * (2 * d) * d)


def test_cli_set_mtp_heads_wraps_any_model():
  from bytescale.cli import _apply_overrides

  model_config, train_config = _apply_overrides(
      tiny_bytelm_config(), configs.TrainConfig(),
      ["num_layers=3", "mtp_heads=4", "mtp_variant=sequential", "mtp_loss_weights=[1,0.2,0.2,0.2]",
       "warmup_steps=3", "d_model=48"])
  assert isinstance(model_config, MultiTokenConfig)
  assert model_config.mtp_heads == 4 and model_config.mtp_variant == "sequential"
  assert model_config.mtp_loss_weights == (1.0, 0.2, 0.2, 0.2)
  assert model_config.trunk.stack.num_layers == 3 and model_config.trunk.stack.d_model == 48
  assert train_config.warmup_steps == 3
  megabyte = registry.get_preset("megabyte", "tiny")
  wrapped, _ = _apply_overrides(megabyte, configs.TrainConfig(), ["mtp_heads=2"])
  assert wrapped.trunk == megabyte and wrapped.head_stack.d_model == megabyte.local_stack.d_model
  with pytest.raises(ConfigError, match="mtp_heads"):
    _apply_overrides(tiny_bytelm_config(), configs.TrainConfig(), ["mtp_heads=0"])


def test_cached_decode_equals_forward(jitted, rng):
  """Chunked decoding with rejected bytes rolled back (plain and drafting caches) gives head 1's forward."""
  ids = jnp.asarray(rng.integers(0, 256, size=(3, 24)), jnp.int32)
  full = np.asarray(jitted.next_logits(jitted.params, ids, jnp.ones_like(ids)))
  decode = jax.jit(lambda p, cache, x: jitted.merge(p).decode(cache, x))
  rollback = jax.jit(lambda p, cache, n: jitted.merge(p).rollback(cache, n))
  # A plain cache runs the trunk and head 1 only, the same for both variants: checked once.
  for drafting in (True,) if jitted.model.sequential else (False, True):
    cache = jitted.model.init_cache(3, 32, drafting=drafting)
    pieces = []
    for start in range(0, 24, 4):
      junk = jnp.asarray(rng.integers(0, 256, size=(3, 4)), jnp.int32)
      _, cache = decode(jitted.params, cache, junk)  # rejected drafts: appended, then rolled back (ragged)
      cache = rollback(jitted.params, cache, jnp.array([4, 4, 4]))
      out, cache = decode(jitted.params, cache, ids[:, start:start + 4])
      pieces.append(np.asarray(out.logits_BxTxV))
    assert_close(np.concatenate(pieces, axis=1), full, atol=3e-5, what=f"drafting={drafting}")
    assert np.asarray(cache.lengths_B).tolist() == [24, 24, 24]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["megabyte", "blt"])
def test_patch_models_with_heads(model_name, rng):
  """Heads on a patch model's byte-level (local decoder) states: loss = float64 reference, gradients = naive."""
  trunk = registry.get_preset(model_name, "tiny")
  if model_name == "blt":
    trunk = configs.replace_path(trunk, "patcher", "space")
  jitted = Jitted(build("parallel", 3, trunk=trunk))
  batch = packed_batch(rng, seq_len=16, rows=2)
  logits = jitted.all_logits(jitted.params, batch["inputs"], batch["segment_ids"])
  assert logits.shape == (3, 2, 16, vocab.VOCAB_SIZE)
  expected, _ = reference_loss(logits, batch, 3, (1.0, 1.0, 1.0))
  (loss, _), efficient = jitted.value_and_grad(jitted.params, batch, True)
  assert_close(loss, expected, atol=2e-4, rtol=1e-5)
  naive = jitted.value_and_grad(jitted.params, batch, False)[1]
  chex.assert_trees_all_close(efficient, naive, atol=2e-6, rtol=1e-4)
