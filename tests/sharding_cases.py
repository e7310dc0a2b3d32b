"""Layouts and tiny model configs shared by test_parallel.py and multidevice_worker.py (no side effects)."""

from bytescale.models import registry
from bytescale import configs
from bytescale.configs import ByteLMConfig, TransformerConfig

LAYOUTS = {"dp": "data=8", "fsdp": "fsdp=8", "tp": "data=2,tensor=4", "dp_fsdp_tp": "data=2,fsdp=2,tensor=2"}
MESH_SIZES = {
    "dp": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
    "tp": {"data": 2, "fsdp": 1, "tensor": 4},
    "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}
MODELS = ("bytelm", "megabyte", "blt")


def model_config(name: str):
  """Tiny configs whose sharded dimensions divide every layout above (heads and kv_heads by 4, embed by 8)."""
  if name == "bytelm":
    stack = TransformerConfig(d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4, mlp_hidden=64)
    return ByteLMConfig(stack=stack, max_seq_len=64)
  config = registry.get_preset(name, "tiny")
  overrides = {
      "megabyte": {"global_stack.num_layers": 1, "local_stack.num_layers": 1, "max_seq_len": 64},
      # Space patching: entropy patching needs a trained entropy model on disk.
      "blt": {"global_stack.num_layers": 1, "decoder.num_layers": 1, "max_seq_len": 64, "patching.patcher": "space"},
  }[name]
  for key, value in overrides.items():
    config = configs.replace_path(config, key, value)
  return config
