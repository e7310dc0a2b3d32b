"""Bucketed patch slots (``bytescale.train.buckets``): a BLT step run at the smallest bucket holding the batch's
patches has the loss and gradients of the step at the full ``max_patches``; the bucket choice; one compilation per
bucket used; the ``patch_buckets`` field."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale import configs, entropy
from bytescale.configs import ByteLMConfig, ConfigError
from bytescale.models import ByteLM, registry
from bytescale.models.blt import BLT, blt_loss, reference_options
from bytescale.parallel import MeshConfig, make_mesh
from bytescale.patching import PatchingConfig
from bytescale.train.buckets import PatchBuckets, bucket_slots_for, choose_slots
from bytescale.train.loop import sharded_training
from tests.conftest import assert_close, tiny_bytelm_config

T = 32


def blt_config(patching_config, **changes):
  config = dataclasses.replace(registry.get_preset("blt", "tiny"), patching=patching_config, max_seq_len=64)
  return dataclasses.replace(config, **changes)


def text_rows(*rows):
  """Byte rows of length T (each text repeated to fill it)."""
  return np.stack([np.frombuffer((text * T)[:T].encode(), np.uint8) for text in rows]).astype(np.int32)


def loss_batch(ids, segment_ids=None):
  segment_ids = np.ones_like(ids) if segment_ids is None else segment_ids
  targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
  loss_mask = (segment_ids != 0).astype(np.float32)
  loss_mask[:, -1] = 0
  return {"inputs": jnp.asarray(ids), "targets": jnp.asarray(targets), "segment_ids": jnp.asarray(segment_ids),
          "loss_mask": jnp.asarray(loss_mask)}


# --- Choosing a bucket -------------------------------------------------------------------------------------------

def test_choose_slots_is_the_smallest_bucket_holding_the_count_else_the_full_size():
  slots = (4, 8, 12, 16)
  for count in range(0, 20):
    holding = [s for s in slots if s >= count]
    assert choose_slots(count, slots) == (holding[0] if holding else 16), count
  assert choose_slots(5, (8,)) == 8 and choose_slots(9, (8,)) == 8  # one size: always it


def test_bucket_slots_of_the_config():
  # T = 100, full = ceil(0.5 * 100) = 50; buckets ceil(12.5) = 13, 25; 0.5 and 0.75 reach the full size.
  config = PatchingConfig("space", max_patches_ratio=0.5, patch_buckets=(0.125, 0.25, 0.5, 0.75))
  assert config.bucket_slots(100) == (13, 25, 50)
  assert PatchingConfig("space", max_patches_ratio=1.0, patch_buckets=(0.25,)).bucket_slots(10) == (3, 10)
  assert bucket_slots_for(blt_config(config), 100) == (13, 25, 50)
  # Nothing to choose: off, every bucket at or above the full size, not a BLT.
  assert bucket_slots_for(blt_config(dataclasses.replace(config, patch_buckets=())), 100) is None
  assert bucket_slots_for(blt_config(dataclasses.replace(config, max_patches_ratio=0.1)), 100) is None
  assert bucket_slots_for(ByteLMConfig(), 100) is None


def test_patch_buckets_field():
  config = registry.get_preset("blt", "tiny")
  assert config.patching.patch_buckets  # on by default
  assert configs.replace_path(config, "patch_buckets", "[0.25, 0.5]").patching.patch_buckets == (0.25, 0.5)
  assert configs.replace_path(config, "patch_buckets", "[]").patching.patch_buckets == ()
  for bad in ("[0.5, 0.25]", "[0.25, 0.25]", "[0, 0.5]", "[1.5]", "0.25", '["a"]'):
    with pytest.raises(ConfigError, match=r"PatchingConfig\.patch_buckets:.*\[\] for off"):
      configs.replace_path(config, "patch_buckets", bad)
  saved = configs.to_dict(configs.replace_path(config, "patch_buckets", "[0.25]"))
  assert registry.config_from_dict(saved).patching.patch_buckets == (0.25,)


# --- Exactness ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def entropy_lm():
  return ByteLM(dataclasses.replace(tiny_bytelm_config(window=8), max_seq_len=64), rngs=nnx.Rngs(11))


def bucketed_equals_full(model, batch, slots):
  """Loss, metrics and gradients of ``blt_loss`` at a bucket (patches computed first, cut to the bucket) against
  the step as it is without buckets (patches at the full size inside the loss)."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  buckets = PatchBuckets.plain(graphdef, slots)
  bucketed, used = buckets(params, frozen, batch)
  full = model.config.patching.max_patches(T)
  assert used["patch_slots"] < full, used  # the batch really runs at a smaller bucket
  assert bucketed["patches"].max_patches == used["patch_slots"]

  @jax.jit
  def loss_and_grads(params, batch):
    loss_fn = lambda p: blt_loss(nnx.merge(graphdef, p, frozen), batch)  # noqa: E731
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, aux), grads = loss_and_grads(params, bucketed)
  (want_loss, want_aux), want_grads = loss_and_grads(params, {k: v for k, v in batch.items() if k != "patches"})
  assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
  for key in want_aux:
    assert_close(aux[key], want_aux[key], atol=1e-5, rtol=1e-5)
  flat, want_flat = nnx.to_flat_state(grads), nnx.to_flat_state(want_grads)
  assert [path for path, _ in flat] == [path for path, _ in want_flat]
  for (path, g), (_, want) in zip(flat, want_flat):
    assert_close(g[...], want[...], atol=2e-5, rtol=1e-4, what=str(path))
  assert max(float(jnp.abs(g[...]).max()) for _, g in want_flat) > 0
  return used


def test_space_patching_bucket_equals_full_size():
  """Packed documents and padding; space patching, bytescale's defaults (previous patch, BOS slots)."""
  model = BLT(small_blt(PatchingConfig("space", max_patches_ratio=1.0)), rngs=nnx.Rngs(0))
  ids = text_rows("ab cd efg hij ", "abcdefgh ijk")
  segments = np.ones_like(ids)
  segments[0, 12:] = 2  # a second document
  segments[1, 25:] = 0  # padding
  used = bucketed_equals_full(model, loss_batch(ids, segments), model.config.patching.bucket_slots(T))
  assert used["max_row_patches"] > model.config.patching.bucket_slots(T)[0]  # not the smallest bucket: cut above


@pytest.mark.slow  # the property of the test above (about 13 s), under entropy patching and the reference's options
def test_entropy_patching_reference_options_bucket_equals_full_size(entropy_lm):
  """The frozen entropy model patches before the step; the reference's options (completed patch: a byte may read
  its own patch's slot, cross-attention in every decoder layer)."""
  ids = text_rows("the cat sat on a mat ", "a b c d e f g h ")
  h = np.asarray(entropy.compute_entropies(entropy_lm, jnp.asarray(ids)))
  threshold = float(np.quantile(h, 0.8))  # about one byte in five opens a patch
  config = reference_options(small_blt(PatchingConfig("entropy", threshold=threshold, max_patches_ratio=1.0)))
  model = BLT(config, rngs=nnx.Rngs(1), entropy_lm=entropy_lm)
  bucketed_equals_full(model, loss_batch(ids), (4, 8, 12, 16, 20, 24, T))


def test_truncated_refuses_slots_out_of_range():
  from bytescale.patching import patch

  patches = jax.jit(lambda ids: patch(PatchingConfig("space"), ids))(text_rows("ab cd "))  # eagerly: an op a compile
  with pytest.raises(ValueError, match="slots"):
    patches.truncated(patches.max_patches + 1)
  with pytest.raises(ValueError, match="slots"):
    patches.truncated(0)


# --- The training path: one compilation per bucket, same losses as without buckets ------------------------------

# T = 32, ratio 0.5: full size 16, buckets 4, 8, 12 and 16. Rows chosen for their largest space-patch count.
ROWS = {
    1: ("abcdefghij", "abcdefghijklmnop"),  # 1 patch (row 0; row 1 too) -> 4 slots
    8: ("abc defg hij ", "abcdefgh"),  # 8 -> 8
    10: ("ab cd ef gh", "abc"),  # 10 -> 12
    16: ("a b c d e f g ", "abcd"),  # 16 -> 16, the full size
}


def space_patch_count(ids_BxT):
  """Patches of space patching over letters and spaces, by hand: byte 0, and each byte after a space that follows
  a letter."""
  return max(1 + sum(1 for t in range(2, T) if row[t - 1] == ord(" ") and row[t - 2] != ord(" ")) for row in ids_BxT)


def train_bucketed(model_config, counts):
  """Trains on the rows of ``counts`` through ``sharded_training``; ``(losses, slots per step, traces, state)``,
  ``traces`` holding the slot count each trace of the loss saw (None: patches inside the step)."""
  traces = []

  def counting_loss(model, batch):
    traces.append(batch["patches"].max_patches if "patches" in batch else None)
    return blt_loss(model, batch)

  train_config = configs.TrainConfig(steps=len(counts), batch_size=2, seq_len=T, warmup_steps=1)
  setup = sharded_training(model_config, train_config, make_mesh(MeshConfig()), loss_fn=counting_loss)
  state = setup.init_state()
  losses, slots = [], []
  for count in counts:
    ids = text_rows(*ROWS[count])
    assert space_patch_count(ids) == count
    state, metrics = setup.train_step(state, setup.shard_batch(loss_batch(ids)))
    losses.append(float(metrics["loss"]))
    slots.append(metrics.get("patch_slots"))
    assert metrics.get("max_row_patches", count) == count
  return losses, slots, traces, state


def small_blt(patching_config):
  return blt_config(patching_config, hash_ngrams=(3,), global_stack=dataclasses.replace(
      registry.get_preset("blt", "tiny").global_stack, num_layers=1))


def test_sharded_training_compiles_once_per_bucket():
  config = small_blt(PatchingConfig("space", max_patches_ratio=0.5))
  _, slots, traces, _ = train_bucketed(config, [1, 8, 1, 8])
  assert slots == [4, 8, 4, 8]
  assert traces == [4, 8]  # one trace (= compilation) per distinct bucket, none when a bucket comes back


@pytest.mark.slow
def test_sharded_training_with_buckets_trains_as_without():
  """Every bucket and the full size, against the same steps with ``patch_buckets=[]`` (patches inside the step)."""
  config = small_blt(PatchingConfig("space", max_patches_ratio=0.5))
  counts = [1, 8, 1, 16, 10, 8]
  losses, slots, traces, state = train_bucketed(config, counts)
  assert slots == [4, 8, 4, 16, 12, 8] and sorted(traces) == [4, 8, 12, 16]
  want_losses, want_slots, want_traces, want_state = train_bucketed(
      configs.replace_path(config, "patch_buckets", "[]"), counts)
  assert want_slots == [None] * len(counts) and want_traces == [None]
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
  # AdamW normalises the updates, so float32 reordering at another shape shows up at about lr * 1e-2 after 6 steps.
  for (path, p), (_, want) in zip(nnx.to_flat_state(state.params), nnx.to_flat_state(want_state.params)):
    assert_close(p[...], want[...], atol=1e-4, what=str(path))


def test_other_models_are_not_bucketed(tiny_config):
  setup = sharded_training(tiny_config, configs.TrainConfig(steps=1, batch_size=2, seq_len=16),
                           make_mesh(MeshConfig()))
  _, metrics = setup.train_step(setup.init_state(), setup.shard_batch(loss_batch(text_rows("ab cd ", "ef")[:, :16])))
  assert "patch_slots" not in metrics


def test_a_run_saved_before_patch_buckets_existed_resumes():
  """The resume check compares model configs with fields added since the save at their defaults."""
  from bytescale.train.loop import _with_new_defaults

  config = configs.to_dict(registry.get_preset("blt", "tiny"))
  old = {**config, "patching": {k: v for k, v in config["patching"].items() if k != "patch_buckets"}}
  assert old != config and _with_new_defaults(old) == config
  changed = configs.to_dict(configs.replace_path(registry.get_preset("blt", "tiny"), "patch_buckets", "[0.25]"))
  assert _with_new_defaults(changed) != config  # a different choice is still a different config
