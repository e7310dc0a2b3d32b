"""Checkpoints written before issue #13 (parameter names with shape suffixes, MegaByte's local attention held
directly by its blocks) still restore, with the logits they gave then.

``tests/fixtures/legacy_checkpoints`` holds tiny runs saved by bytescale at commit 8fd78a6 and ``logits.npz``, the
logits each model computed then on a fixed input (``tests/fixtures/make_legacy_checkpoints.sh`` wrote both with
that commit's code).
"""

from __future__ import annotations

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale import configs
from bytescale.models import registry
from bytescale.train import checkpoint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "legacy_checkpoints"
LEGACY_LOGITS = np.load(FIXTURES / "logits.npz")


def logits_of(model):
  """The model's logits on the fixed input, jitted (eagerly, each op of the model would compile on its own)."""
  return nnx.jit(lambda model, ids: model(ids).logits_BxTxV)(model, jnp.asarray(LEGACY_LOGITS["ids"]))


@pytest.mark.parametrize("name", ["bytelm", "mtp", "megabyte", "entropy", "blt"])
def test_legacy_checkpoint_restores_with_the_logits_it_had(name):
  model, meta = checkpoint.load_model(str(FIXTURES / name))
  assert meta["step"] == 2
  np.testing.assert_allclose(np.asarray(logits_of(model)), LEGACY_LOGITS[name], rtol=1e-5, atol=1e-5)


def test_legacy_entropy_model_loads_for_blt():
  lm = checkpoint.load_entropy_model(str(FIXTURES / "entropy"))
  np.testing.assert_allclose(np.asarray(logits_of(lm)), LEGACY_LOGITS["entropy"], rtol=1e-5, atol=1e-5)


def test_legacy_checkpoint_warm_starts_with_its_parameters():
  model, _ = checkpoint.load_model(str(FIXTURES / "bytelm"))
  _, expected = nnx.split(model, nnx.Param)
  fresh = registry.build_model(model.config, seed=7)
  _, like = nnx.split(fresh, nnx.Param)
  params, info = checkpoint.load_params(str(FIXTURES / "bytelm"), like)
  assert info["step"] == 2
  chex.assert_trees_all_equal(jax.tree.leaves(params), jax.tree.leaves(expected))


def test_upgrade_renames_suffixes_and_nests_megabyte_local_attention():
  old = {"embed": {"table_VxD": {"value": 1}}, "unembed_DxV": {"value": 2}, "local_pad_D": {"value": 3},
         "local_stack": {"blocks": {"attention_norm": {"scale": {"value": 4}}, "wq_DxHxK": {"value": 5},
                                    "wk_DxGxK": {"value": 6}, "wv_DxGxK": {"value": 7}, "wo_HxKxD": {"value": 8}}},
         "decoder_cross": {"q_norm": {"scale": {"value": 9}}, "wq_DxHxK": {"value": 10}, "wk_DxHxK": {"value": 11},
                           "wv_DxHxK": {"value": 12}, "wo_HxKxD": {"value": 13}}}
  assert checkpoint.upgrade_legacy_names(old) == {
      "embed": {"table": {"value": 1}}, "unembedding": {"value": 2}, "local_pad": {"value": 3},
      "local_stack": {"blocks": {"attention_norm": {"scale": {"value": 4}}, "attention": {
          "wq": {"value": 5}, "wk": {"value": 6}, "wv": {"value": 7}, "wo": {"value": 8}}}},
      # BLT's cross-attention has no attention_norm: its projections stay where they are.
      "decoder_cross": {"q_norm": {"scale": {"value": 9}}, "wq": {"value": 10}, "wk": {"value": 11},
                        "wv": {"value": 12}, "wo": {"value": 13}}}
  today = checkpoint.upgrade_legacy_names(old)
  assert checkpoint.upgrade_legacy_names(today) == today


def test_a_checkpoint_of_another_shape_names_the_variable():
  model, _ = checkpoint.load_model(str(FIXTURES / "bytelm"))
  wider = configs.replace_path(model.config, "mlp_hidden", "96")
  _, like = nnx.split(nnx.eval_shape(lambda: registry.build_model(wider)), nnx.Param)
  with pytest.raises(configs.ConfigError, match="mlp.w_down"):
    checkpoint.load_params(str(FIXTURES / "bytelm"), like)
