"""Configs: validation names the field, presets build, overrides apply together, JSON round trip."""

import dataclasses

import pytest

from bytescale.models import registry
from bytescale import configs
from bytescale.configs import ConfigError, TrainConfig, TransformerConfig


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: TransformerConfig(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (lambda: TransformerConfig(head_dim=7), "head_dim"),
        (lambda: TransformerConfig(d_model=0), "d_model"),
        (lambda: TransformerConfig(remat="sometimes"), "remat"),
        (lambda: TransformerConfig(window=0), "window"),
        (lambda: TrainConfig(learning_rate=-1.0), "learning_rate"),
        (lambda: TrainConfig(min_lr_ratio=2.0), "min_lr_ratio"),
        (lambda: TrainConfig(batch_size=0), "batch_size"),
    ],
)
def test_invalid_values_name_the_field(make, field):
  with pytest.raises(ConfigError, match=field):
    make()


def test_every_preset_builds_and_round_trips_through_json():
  for model, spec in registry.MODELS.items():
    for name, config in spec.presets.items():
      assert registry.config_from_dict(configs.to_dict(config)) == config, (model, name)


def test_overrides_resolve_unique_names_and_reject_unknown_or_ambiguous():
  config = registry.get_preset("bytelm", "tiny")
  assert configs.replace_path(config, "num_layers", "5").stack.num_layers == 5
  assert configs.replace_path(config, "stack.window", "none").stack.window is None
  assert configs.replace_path(config, "tie_embeddings", "true").tie_embeddings is True
  with pytest.raises(ConfigError, match="is not a field"):
    configs.replace_path(config, "num_layerz", "5")
  with pytest.raises(ConfigError, match="cannot parse"):
    configs.replace_path(config, "num_layers", "five")
  # A bare name that two stacks share: MegaByte has global_stack.num_layers and local_stack.num_layers.
  megabyte = registry.get_preset("megabyte", "tiny")
  with pytest.raises(ConfigError, match="num_layers: is ambiguous") as error:
    configs.replace_path(megabyte, "num_layers", "5")
  assert "global_stack.num_layers" in str(error.value) and "local_stack.num_layers" in str(error.value)
  # A dotted suffix makes it unique again; the other stack keeps its depth.
  deeper = configs.replace_path(megabyte, "local_stack.num_layers", "5")
  assert deeper.local_stack.num_layers == 5 and deeper.global_stack == megabyte.global_stack


def test_fields_valid_only_together_can_be_set_in_any_order():
  config = registry.get_preset("bytelm", "tiny")
  pairs = [("rope_type", "yarn"), ("factor", "4"), ("original_max_position_embeddings", "256")]
  for order in (pairs, pairs[::-1]):
    rope = configs.replace_paths(config, order).stack.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 256)
  with pytest.raises(ConfigError):  # alone, yarn without its original length is invalid
    configs.replace_path(config, "rope_type", "yarn")


def test_a_rope_scaling_json_block_sets_the_whole_rope_config():
  config = registry.get_preset("bytelm", "tiny")
  rope = configs.replace_path(config, "stack.rope", '{"rope_type": "linear", "factor": 2.0}').stack.rope
  assert dataclasses.asdict(rope)["rope_type"] == "linear" and rope.factor == 2.0
  assert rope.rope_theta == config.stack.rope.rope_theta


def test_unknown_model_and_preset():
  with pytest.raises(ConfigError, match="unknown model"):
    registry.get_preset("gpt", "tiny")
  with pytest.raises(ConfigError, match="no preset"):
    registry.get_preset("bytelm", "enormous")
