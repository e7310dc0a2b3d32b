"""BLT: causality with entropy patching, document isolation, precomputed == in-forward patches, cached decoding
== forward (ragged prefill, rollback across patches), the frozen entropy model, overflow, CLI end to end."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale.models import mtp, registry
from bytescale import configs, entropy, patching, vocab
from bytescale.configs import ConfigError
from bytescale.generate import prefill
from bytescale.models import ByteLM
from bytescale.models.blt import BLT, BLTConfig, Frozen, blt_loss, flops_per_byte
from bytescale.patching import PatchingConfig
from bytescale.train.checkpoint import resolve_entropy_model
from tests.conftest import assert_close, tiny_bytelm_config

T = 28


def random_ids(rng, b, t):
  # Bytes from a small alphabet with spaces, so space patching makes patches of a few bytes.
  alphabet = np.array([ord(c) for c in "abcde fgh ij"] + [0, 200])
  return jnp.asarray(rng.choice(alphabet, size=(b, t)), jnp.int32)


@pytest.fixture(scope="module")
def entropy_lm():
  config = dataclasses.replace(tiny_bytelm_config(window=8), max_seq_len=64)
  return ByteLM(config, rngs=nnx.Rngs(11))


@pytest.fixture(scope="module")
def threshold(entropy_lm):
  """The median entropy of the (random) entropy model, so that about every other byte opens a patch."""
  ids = random_ids(np.random.default_rng(5), 4, 64)
  entropies = nnx.jit(entropy.compute_entropies)(entropy_lm, ids)  # eagerly, each op would compile on its own
  return float(np.median(np.asarray(entropies)))


def blt_config(patching_config):
  return dataclasses.replace(registry.get_preset("blt", "tiny"), patching=patching_config)


@pytest.fixture(scope="module")
def models(entropy_lm, threshold):
  """One model per patcher (same parameter shapes, so initialisation compiles once)."""
  return {
      "entropy": BLT(blt_config(PatchingConfig("entropy", threshold=threshold)), rngs=nnx.Rngs(0),
                     entropy_lm=entropy_lm),
      "space": BLT(blt_config(PatchingConfig("space")), rngs=nnx.Rngs(1)),
      "strided": BLT(blt_config(PatchingConfig("strided", stride=3, max_patch_length=2)), rngs=nnx.Rngs(2)),
  }


class Compiled:
  """A model's forward and decode, jitted once with the state as an argument (shared by every test)."""

  def __init__(self, model):
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    self._forward = jax.jit(lambda state, ids, segs, patches: nnx.merge(self.graphdef, state).forward(
        ids, segs, patches=patches))
    self._decode = jax.jit(lambda state, cache, ids: nnx.merge(self.graphdef, state).decode(cache, ids))

  def forward(self, ids, segs=None, patches=None):
    out, p = self._forward(self.state, ids, jnp.ones_like(ids) if segs is None else segs, patches)
    return out.logits_BxTxV, p

  # The model protocol, for bytescale.generate.prefill.
  def init_cache(self, batch, max_len):
    return self.model.init_cache(batch, max_len)

  def decode(self, cache, ids):
    return self._decode(self.state, cache, ids)

  def rollback(self, cache, n_B):
    return self.model.rollback(cache, n_B)


@pytest.fixture(scope="module")
def compiled(models):
  return {name: Compiled(model) for name, model in models.items()}


@pytest.fixture(scope="module")
def entropy_forward(compiled):
  return compiled["entropy"].forward


def padded(rows, segments=None):
  """Rows of any lengths <= T as one (2, T) batch: PAD ids, segment 0 after each row (all forwards share a shape)."""
  ids = np.full((2, T), vocab.PAD, np.int32)
  segs = np.zeros((2, T), np.int32)
  for r, row in enumerate(rows):
    ids[r, : len(row)] = np.asarray(row)
    segs[r, : len(row)] = 1 if segments is None else segments[r]
  return jnp.asarray(ids), jnp.asarray(segs)


def test_forward_shapes_dtypes_and_patch_sizes(models, entropy_forward, rng):
  ids = random_ids(rng, 2, T)
  logits, patches = entropy_forward(ids)
  assert logits.shape == (2, T, vocab.VOCAB_SIZE) and logits.dtype == jnp.float32
  assert patches.max_patches == T
  sizes = T / np.asarray(patches.num_patches_B)
  assert np.all((sizes > 1.2) & (sizes < 4)), sizes  # the median threshold gives real multi-byte patches


def test_causal_with_entropy_patching(entropy_forward, rng):
  """Changing bytes after t changes neither the logits at <= t nor whether bytes <= t+1 open patches."""
  ids = random_ids(rng, 2, T)
  base_logits, base_patches = entropy_forward(ids)
  for t in (0, 6, 13, 25):
    changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 101) % 256)
    logits, patches = entropy_forward(changed)
    np.testing.assert_array_equal(np.asarray(logits[:, : t + 1]), np.asarray(base_logits[:, : t + 1]))
    np.testing.assert_array_equal(np.asarray(patches.starts_BxT[:, : t + 2]),
                                  np.asarray(base_patches.starts_BxT[:, : t + 2]))
    np.testing.assert_array_equal(np.asarray(patches.patch_ids_BxT[:, : t + 2]),
                                  np.asarray(base_patches.patch_ids_BxT[:, : t + 2]))
    assert not np.allclose(logits[:, t + 1:], base_logits[:, t + 1:])


@pytest.mark.parametrize("patcher", ["entropy", pytest.param("space", marks=pytest.mark.slow)])
def test_documents_do_not_see_each_other(patcher, compiled, rng):
  """A packed row gives each document exactly the patches and logits it gets alone."""
  forward = compiled[patcher].forward
  a, b = np.asarray(random_ids(rng, 1, 11)[0]), np.asarray(random_ids(rng, 1, 17)[0])
  packed, packed_segs = padded([np.concatenate([a, b]), a], [[1] * 11 + [2] * 17, 1])
  logits, patches = forward(packed, packed_segs)
  alone, alone_segs = padded([a, b])
  alone_logits, alone_patches = forward(alone, alone_segs)
  assert_close(logits[0, :11], alone_logits[0, :11], atol=2e-5)
  assert_close(logits[0, 11:], alone_logits[1, :17], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(patches.starts_BxT[0, :11]), np.asarray(alone_patches.starts_BxT[0, :11]))
  np.testing.assert_array_equal(np.asarray(patches.starts_BxT[0, 11:]), np.asarray(alone_patches.starts_BxT[1, :17]))


def test_precomputed_patches_equal_in_forward_patches(models, entropy_lm, entropy_forward, rng):
  """Patches made outside (e.g. in a data pipeline, from the entropy model's entropies) are the ones the forward
  pass computes itself, and give identical logits."""
  model = models["entropy"]
  ids = random_ids(rng, 2, T)
  segs = jnp.asarray([[1] * 10 + [2] * 18, [1] * 25 + [0] * 3])
  h = entropy.compute_entropies(entropy_lm, ids, segs)
  outside = patching.patch(model.config.patching, ids, segs, entropies_BxT=h)
  logits, inside = entropy_forward(ids, segs)
  chex.assert_trees_all_equal(outside, inside)
  given, _ = entropy_forward(ids, segs, outside)
  np.testing.assert_array_equal(np.asarray(given), np.asarray(logits))


PIECES = [(0, 1), (1, 10), (10, 11), (11, 12), (12, 21), (21, 22), (22, 23)]  # 1 and 9 bytes at a time


@pytest.mark.parametrize("patcher", ["entropy", pytest.param("space", marks=pytest.mark.slow),
                                     pytest.param("strided", marks=pytest.mark.slow)])
def test_cached_decode_equals_forward(patcher, compiled, rng):
  c = compiled[patcher]
  ids = random_ids(rng, 2, 23)
  full, patches = c.forward(*padded(list(ids)))
  full = full[:, :23]
  assert int(patches.num_patches_B.min()) >= 4  # several patches close along the way
  cache = c.model.init_cache(2, 32)
  pieces = []
  for start, stop in PIECES:
    out, cache = c.decode(cache, ids[:, start:stop])
    pieces.append(np.asarray(out.logits_BxTxV))
  assert_close(np.concatenate(pieces, axis=1), full, atol=5e-5)
  assert np.asarray(cache.lengths_B).tolist() == [23, 23]


def test_cached_decode_reads_recent_bytes_or_the_whole_buffer(compiled, rng, monkeypatch):
  """A decode step encodes its closing patches from a window of the last ``DECODE_PATCH_WINDOW`` buffered bytes
  when every one of them starts inside it, else from the whole buffer. With a window of 2 bytes both happen
  along these pieces (1 byte at a time: patches of 1-2 bytes fit, longer ones do not; 9 at a time: several patches
  close, the first well before the window); either way the logits are the forward pass's."""
  from bytescale.models import blt as blt_module

  monkeypatch.setattr(blt_module, "DECODE_PATCH_WINDOW", 2)
  c = compiled["entropy"]
  decode = jax.jit(lambda state, cache, ids: nnx.merge(c.graphdef, state).decode(cache, ids))  # traced with 2
  ids = random_ids(rng, 2, 23)
  full, patches = c.forward(*padded(list(ids)))
  lengths = np.diff(np.flatnonzero(np.r_[np.asarray(patches.starts_BxT[0, :23]), True]))
  assert lengths.max() > 2 and lengths.min() <= 2  # patches that fit the window and one that does not
  cache = c.model.init_cache(2, 32)
  pieces = []
  for start, stop in PIECES:
    out, cache = decode(c.state, cache, ids[:, start:stop])
    pieces.append(np.asarray(out.logits_BxTxV))
  assert_close(np.concatenate(pieces, axis=1), full[:, :23], atol=5e-5)


def test_ragged_prefill_then_rollback_across_patches(compiled, rng):
  """Rows of different lengths through ``generate.prefill``; then a rollback over several patches and new bytes:
  every step equals the teacher-forced forward of the row as it stands."""
  c = compiled["entropy"]
  ids = random_ids(rng, 2, 9)
  lengths = jnp.array([9, 4])
  cache, logits, _ = prefill(c, ids, lengths, 32)  # the real generate.prefill, through the shared jitted decode

  def forward_row(row):
    return c.forward(*padded([row]))[0][0, : len(row)]

  for r, n in enumerate([9, 4]):
    assert_close(logits[r], forward_row(ids[r, :n])[-1], atol=5e-5)
  more = random_ids(rng, 2, 9)
  _, cache = c.decode(cache, more)
  cache = c.rollback(cache, jnp.array([7, 1]))  # back over several patch boundaries in row 0
  fresh = random_ids(rng, 2, 1)
  out, cache = c.decode(cache, fresh)
  for r, (n, kept) in enumerate(zip([9, 4], [2, 8])):
    row = np.concatenate([np.asarray(ids[r, :n]), np.asarray(more[r, :kept]), np.asarray(fresh[r])])
    assert_close(out.logits_BxTxV[r], forward_row(row)[-1:], atol=5e-5)


def test_entropy_model_is_frozen_and_float32(entropy_lm, threshold, models, rng):
  """The entropy model's weights are ``Frozen`` variables: outside ``nnx.Param``, so the train state keeps them
  in ``frozen`` (checkpointed, never updated); a bfloat16 entropy model is rebuilt in float32."""
  model = models["entropy"]
  _, params, frozen = nnx.split(model, nnx.Param, ...)
  assert "entropy_lm" not in params and "entropy_lm" in frozen
  variables = jax.tree.leaves(nnx.state(model.entropy_lm), is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert variables and all(isinstance(v, Frozen) for v in variables)
  bf16_config = dataclasses.replace(entropy_lm.config,
                                    stack=dataclasses.replace(entropy_lm.config.stack, dtype="bfloat16"))
  blt = BLT(blt_config(PatchingConfig("entropy", threshold=threshold)), rngs=nnx.Rngs(0),
            entropy_lm=ByteLM(bf16_config, rngs=nnx.Rngs(0)))
  assert blt.entropy_lm.config.stack.dtype == "float32"
  graphdef, state = nnx.split(blt)
  h = jax.jit(lambda state, ids: nnx.merge(graphdef, state).entropies(ids))(state, random_ids(rng, 2, T))
  assert h.dtype == jnp.float32


def loss_batch(ids):
  n = ids.shape[1] - 1
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.ones((2, n), jnp.int32),
          "loss_mask": jnp.ones((2, n), jnp.float32)}


@pytest.mark.slow
def test_training_moves_parameters_not_the_entropy_model(models, rng):
  import optax

  from bytescale.train.state import init_train_state
  from bytescale.train.step import make_train_step

  graphdef, state = init_train_state(models["entropy"], optax.sgd(0.1))
  new_state, metrics = jax.jit(make_train_step(graphdef, optax.sgd(0.1)))(state, loss_batch(random_ids(rng, 2, 17)))
  assert float(metrics["grad_norm"]) > 0 and "average_patch_size" in metrics  # BLT.loss adds patch metrics
  before, after = nnx.to_pure_dict(state.params), nnx.to_pure_dict(new_state.params)
  assert np.any(np.asarray(before["hash_table"]) != np.asarray(after["hash_table"]))
  w_up = lambda tree: np.asarray(tree["global_stack"]["blocks"]["mlp"]["w_up"])  # noqa: E731
  assert np.any(w_up(before) != w_up(after))
  chex.assert_trees_all_equal(state.frozen, new_state.frozen)


def test_overflow_keeps_every_byte_in_the_loss(compiled, rng):
  """Too few patch slots: the extra patches merge into the last slot, every byte is still scored, and the
  merged bytes are counted."""
  config = blt_config(PatchingConfig("strided", stride=2, max_patches_ratio=0.25))
  graphdef, state = nnx.split(BLT(config, rngs=nnx.Rngs(0)))
  loss, metrics = jax.jit(lambda state, batch: blt_loss(nnx.merge(graphdef, state), batch))(
      state, loss_batch(random_ids(rng, 2, 17)))
  assert np.isfinite(float(loss))
  assert float(metrics["count"]) == 32
  # 16 bytes, stride 2: 8 patches, 4 slots -> patches 3..7 share slot 3: bytes 8..15 would be in later patches.
  assert int(metrics["overflow_bytes"]) == 2 * 8 and int(metrics["overflow_rows"]) == 2
  assert float(metrics["average_patch_size"]) == 4.0  # bytes per slot actually used


def test_segment_local_attention_equals_dense_segment_masked_attention(rng):
  """Encoder cross-attention without the (K * Q) x T score matrix equals dense attention under the segment mask
  it replaces (query segment p + 1 where valid, key segment id + 1 for ids in [0, K)), values and gradients:
  ids out of order, padding (-1), ids >= K (ignored), a valid patch with no bytes, a non-valid one with bytes."""
  from bytescale.ops.attention import attention, attention_reference
  from bytescale.ops.mask import AttentionMask

  b, t, k, nq, h, d = 2, 13, 5, 2, 3, 4
  ids = jnp.asarray([[0, 0, 1, 1, 1, 3, 3, 0, -1, 5, 7, -1, 1],
                     [4, 4, 4, 2, 2, 2, 2, 0, 0, 1, 1, 3, -1]], jnp.int32)
  valid = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 0, 1]], bool)  # row 0: patch 2 empty; row 1: patch 3 masked
  q, keys, values, w = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                        for shape in ((b, k, nq, h, d), (b, t, h, d), (b, t, h, d), (b, k, nq, h, d)))

  def dense(q, keys, values):
    q_segments = jnp.repeat(jnp.where(valid, jnp.arange(1, k + 1), 0), nq, axis=1)
    kv_segments = jnp.where((ids >= 0) & (ids < k), ids + 1, 0)
    zeros = lambda n: jnp.zeros((b, n), jnp.int32)  # noqa: E731
    mask = AttentionMask(zeros(k * nq), zeros(t), q_segments, kv_segments, causal=False)
    out = attention_reference(q.reshape(b, k * nq, h, d), keys, values, mask)
    return out.reshape(b, k, nq, h, d)

  local_mask = AttentionMask.segment_local(ids, valid, nq)
  local = lambda q, keys, values: attention(  # noqa: E731  (the XLA dispatch takes segment_local_attention)
      q.reshape(b, k * nq, h, d), keys, values, local_mask, impl="xla").reshape(b, k, nq, h, d)
  expected = dense(q, keys, values)
  # The implementations under test run jitted, as the models call them (eagerly, each op would compile on its own).
  assert_close(jax.jit(local)(q, keys, values), expected, atol=1e-5)
  # The same mask through the Pallas kernel (interpret mode here): one mask value for every implementation.
  pallas = jax.jit(lambda q, keys, values: attention(q.reshape(b, k * nq, h, d), keys, values, local_mask,
                                                     impl="pallas"))(q, keys, values).reshape(b, k, nq, h, d)
  assert_close(pallas, expected, atol=1e-5)
  assert float(jnp.abs(expected[0, 2]).max()) == 0 and float(jnp.abs(expected[1, 3]).max()) == 0
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))  # noqa: E731
  for actual, wanted in zip(jax.jit(grad(local))(q, keys, values), grad(dense)(q, keys, values)):
    assert_close(actual, wanted, atol=1e-5)


def test_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="entropy_model"):  # built abstractly: no parameter is initialised
    nnx.eval_shape(lambda: BLT(registry.get_preset("blt", "tiny"), rngs=nnx.Rngs(0)))
  missing = configs.replace_path(registry.get_preset("blt", "tiny"), "entropy_model", str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match="entropy_model.*does not exist"):
    resolve_entropy_model(missing)
  with pytest.raises(ConfigError, match="entropy_model.*does not exist"):  # also as the trunk of multi-token heads
    resolve_entropy_model(mtp.wrap(missing, mtp_heads=2))
  with pytest.raises(ConfigError, match="hash_ngrams"):
    dataclasses.replace(registry.get_preset("blt", "tiny"), hash_ngrams=(3, 3))


# The BLT paper's shapes (l_E, h_E, l_G, h_G, l_D); the local decoder is built as wide as the encoder.
PAPER_SHAPES = {"400m": (1, 768, 24, 1280, 7), "1b": (1, 1024, 25, 2048, 9)}


def stack_shape_and_size(tree):
  """``(layers, width, parameter count)`` of a transformer stack's arrays: all stacked on a leading layers axis,
  the norm scales the only ``(layers, width)`` ones."""
  leaves = jax.tree.leaves(tree)
  (layers,) = {x.shape[0] for x in leaves}
  (width,) = {x.shape[1] for x in leaves if x.ndim == 2}
  return layers, width, sum(math.prod(x.shape) for x in leaves)


@pytest.mark.parametrize("name", list(PAPER_SHAPES))
def test_paper_presets_build_the_paper_shapes(name):
  """Read off the arrays of the model the preset builds (abstractly: nothing is allocated); each stack's size
  counted by hand: per layer two norms, Q, K, V and O of width x width (heads x head_dim = width, as many KV
  heads as query heads) and a SwiGLU of three width x f matrices, f = 8 * width / 3 rounded up to a multiple of
  32."""
  l_e, h_e, l_g, h_g, l_d = PAPER_SHAPES[name]
  # Space patching: the shapes are the same and no trained entropy model is needed to build it.
  config = dataclasses.replace(registry.get_preset("blt", name), patching=PatchingConfig("space"))
  params = nnx.state(nnx.eval_shape(lambda: BLT(config, rngs=nnx.Rngs(0))), nnx.Param)

  def by_hand(layers, width):
    f = math.ceil(8 * width / 3 / 32) * 32
    return layers * (2 * width + 4 * width * width + 3 * width * f)

  for stack, (layers, width) in {"encoder": (l_e, h_e), "global_stack": (l_g, h_g), "decoder": (l_d, h_e)}.items():
    assert stack_shape_and_size(params[stack]) == (layers, width, by_hand(layers, width)), (name, stack)


def test_presets_and_flops():
  for name in ("tiny", "small", "400m", "1b"):
    config = registry.get_preset("blt", name)
    assert isinstance(config, BLTConfig) and config.patching.patcher == "entropy"
  big = registry.get_preset("blt", "1b")
  # Larger patches make the global model cheaper per byte; the byte-level parts do not change.
  f4, f8 = flops_per_byte(big, 8192, 4.0), flops_per_byte(big, 8192, 8.0)
  part = lambda count, prefix: sum(v for k, v in count.components.items() if k.startswith(prefix))  # noqa: E731
  assert part(f8, "global.") < part(f4, "global.") / 1.9
  assert f8.components["decoder.mlp"] == f4.components["decoder.mlp"]
  # The training count is what XLA compiles for a training step (value_and_grad of the loss) at the preset's
  # widths: one unrolled layer per stack, strided patches of 4 bytes filling every slot of 64 bytes.
  from tests.test_flops import BATCH, abstract, assert_agrees, cross_entropy, ids_spec, measured_training

  one_layer = lambda stack: dataclasses.replace(stack, num_layers=1, scan_layers=False)  # noqa: E731
  small = dataclasses.replace(big, encoder=one_layer(big.encoder), global_stack=one_layer(big.global_stack),
                              decoder=one_layer(big.decoder), max_seq_len=64,
                              patching=PatchingConfig("strided", stride=4, max_patches_ratio=0.25))
  graphdef, state = abstract(lambda: BLT(small, rngs=nnx.Rngs(0)))
  measured = measured_training(cross_entropy(graphdef), state, ids_spec(64), num_bytes=BATCH * 64)
  assert_agrees(measured, flops_per_byte(small, 64, attention="dense").training, "1b widths, training step")


@pytest.mark.slow
def test_global_path_carries_context():
  """With 1-byte local windows and no hash n-grams, the only route to earlier bytes is the patch path (encoder
  cross-attention -> global model -> decoder cross-attention). Rows repeat a random permutation of 16 letters,
  so a byte-local model cannot beat ln(16) nats in the second half; BLT must learn to read earlier patches."""
  import optax

  from bytescale.ops.losses import masked_cross_entropy

  base = registry.get_preset("blt", "tiny")
  config = dataclasses.replace(base, hash_ngrams=(), patching=PatchingConfig("strided", stride=2),
                               encoder=dataclasses.replace(base.encoder, window=1),
                               decoder=dataclasses.replace(base.decoder, window=1))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(np.stack([np.tile(rng.permutation(16) + 97, 5)[:65] for _ in range(32)]), jnp.int32)
  graphdef, params = nnx.split(BLT(config, rngs=nnx.Rngs(0)), nnx.Param)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(ids[:, :-1]).logits_BxTxV
      nll, count = masked_cross_entropy(logits[:, 32:], ids[:, 33:], jnp.ones((32, 32)))
      return nll / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 0.5 * np.log(16), float(loss)


@pytest.mark.slow
def test_cli_trains_entropy_model_then_blt_and_generates(tmp_path, capsys):
  """Both stages through ``bytescale.cli.main``, then eval and generate from the BLT checkpoint, whose
  in-forward patches equal patches precomputed with the entropy checkpoint."""
  from bytescale.cli import main
  from bytescale.train.checkpoint import load_entropy_model
  from bytescale.train.checkpoint import load_model

  data = tmp_path / "corpus.txt"
  data.write_bytes(b"the cat sat on the mat. the dog sat on the log. " * 60)
  common = ["--data", str(data), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--no-progress",
            "--set", "eval_batches=1"]
  ent_dir, blt_dir = str(tmp_path / "entropy"), str(tmp_path / "blt")
  assert main(["train", "--model", "bytelm", "--preset", "entropy-tiny", "--out", ent_dir, *common,
               "--set", "d_model=32", "--set", "head_dim=8", "--set", "mlp_hidden=64"]) == 0
  capsys.readouterr()
  assert main(["train", "--model", "blt", "--preset", "tiny", "--out", blt_dir, *common,
               "--set", f"entropy_model={ent_dir}", "--set", "threshold=4.0"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["model"] == "blt" and summary["steps"] == 3 and 0 < summary["val_bpb"] < 12
  assert main(["generate", "--ckpt", blt_dir, "--prompt", "the ", "--max-bytes", "12", "--json",
               "--temperature", "0"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bytes"] <= 12

  model, meta = load_model(blt_dir)
  assert meta["model_config"]["entropy_model_config"]["__type__"] == "ByteLMConfig"
  lm = load_entropy_model(ent_dir)
  ids = jnp.asarray([list(b"the dog sat on the mat.")])
  outside = patching.patch(model.config.patching, ids, entropies_BxT=entropy.compute_entropies(lm, ids))
  inside = model.patch(ids)
  for a, b in zip(jax.tree.leaves(outside), jax.tree.leaves(inside)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
