"""Hugging Face BLT checkpoints (``BltForCausalLM``: ``config.json`` + safetensors) to and from bytescale.

    config, params = from_hf("blt-1b-hf")            # BLTConfig + {our variable name: array}
    model = load_hf_model("blt-1b-hf", mesh=mesh)    # a BLT, each array placed straight onto its sharding
    to_hf(config, params, "exported")                # config.json + model.safetensors that transformers reads

The model is our ``BLT`` with ``blt.reference_options`` (docs/blt.md lists what they change). Three things are
mapped at this boundary and nowhere else:

* Token ids. The reference numbers BOE 0, BOS 1, EOS 2, BPE 3, byte b as b + 4; we number bytes 0..255, BOS 256,
  EOS 257, PAD 258 (for BOE), RESERVED 259 (for BPE). Both have 260 ids, so embedding rows and output columns are
  permuted (``vocab.reference_id_table``): every log-probability is unchanged. The reference hash reads the
  reference ids; the model maps ours before hashing.
* RoPE pairing. transformers' BLT rotates adjacent feature pairs (2i, 2i+1); ours rotates (i, i + K/2). The
  query and key features of each head are permuted to match (scores are unchanged: both sides move alike).
* Weight layout. torch ``Linear`` weights are ``[out, in]``; ours are ``[in, ...]`` split by head, and the layers
  of a stack are stacked on a leading axis.

Bad input raises ``ConfigError`` naming the file, key or field (the command line exits 2 with that line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from bytescale import configs, vocab
from bytescale.configs import ByteLMConfig, ConfigError, TransformerConfig
from bytescale.models.blt import BLT, BLTConfig
from bytescale.ops.rope import RopeConfig
from bytescale.patching import PatchingConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# config.json keys transformers writes that do not change the function the model computes (generation defaults,
# bookkeeping, initialisation, dropout at inference); every other key must be one we read, or we refuse the file.
_IGNORED_KEYS = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "model_type", "initializer_range", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "dropout", "patching_batch_size",
    "patching_device", "realtime_patching", "output_attentions", "output_hidden_states", "return_dict",
    "_name_or_path", "_attn_implementation", "attn_impl", "attn_bias_type", "is_encoder_decoder", "id2label",
    "label2id", "max_position_embeddings", "hidden_size_global", "cross_attn_k", "encoder_cross_output_size",
    "head_dim", "problem_type", "chunk_size_feed_forward", "tokenizer_class", "pm_size", "patch_size",
}
_TOP_KEYS = {"vocab_size", "patch_in_forward", "patching_mode", "patching_threshold", "max_patch_length",
             "local_attention_window_len", "encoder_hash_byte_group_size", "encoder_hash_byte_group_vocab",
             "encoder_hash_byte_group_nb_functions", "patcher_config", "encoder_config", "decoder_config",
             "global_config", "rope_parameters", "monotonicity", "patching_threshold_add"}
_STACK_KEYS = {"hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "rms_norm_eps",
               "intermediate_size", "rope_parameters", "hidden_act", "sliding_window", "vocab_size",
               "cross_attn_all_layers"}


# --- Config -----------------------------------------------------------------------------------------------

def _check_keys(section: dict, known: set[str], where: str):
  for key in section:
    if key not in known and key not in _IGNORED_KEYS:
      raise ConfigError(f"{where}: unknown field {key!r}; a newer transformers BLT? remove it only if it does not "
                        "change the model")


def _field(section: dict, key: str, where: str):
  if key not in section:
    raise ConfigError(f"{where}: missing field {key!r}")
  return section[key]


def _rope_theta(section: dict, where: str, default: float) -> float:
  rope = section.get("rope_parameters") or {}
  if not isinstance(rope, dict):
    raise ConfigError(f"{where}.rope_parameters: expected an object, got {rope!r}")
  if rope.get("rope_type", "default") != "default":
    raise ConfigError(f"{where}.rope_parameters.rope_type: only 'default' is converted, got {rope['rope_type']!r}")
  return float(rope.get("rope_theta", default))


def _stack_config(section: dict, where: str, *, window: int | None, default_theta: float) -> TransformerConfig:
  _check_keys(section, _STACK_KEYS, where)
  act = section.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{where}.hidden_act: only 'silu' (SwiGLU) is converted, got {act!r}")
  d = int(_field(section, "hidden_size", where))
  heads = int(_field(section, "num_attention_heads", where))
  if d % heads:
    raise ConfigError(f"{where}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
  kv_heads = int(section.get("num_key_value_heads") or heads)
  return TransformerConfig(
      d_model=d, num_layers=int(_field(section, "num_hidden_layers", where)), num_heads=heads, num_kv_heads=kv_heads,
      head_dim=d // heads, mlp_hidden=int(_field(section, "intermediate_size", where)),
      norm_eps=float(section.get("rms_norm_eps", 1e-5)), window=window,
      rope=RopeConfig(rope_theta=_rope_theta(section, where, default_theta)), dtype="float32")


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> BLTConfig:
  """The ``BLTConfig`` (reference options, entropy patching) of a transformers BLT ``config.json`` dict."""
  if hf.get("model_type") != "blt":
    raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}, not 'blt': not a Hugging Face BLT")
  _check_keys(hf, _TOP_KEYS, source)
  if int(hf.get("vocab_size", 260)) != vocab.VOCAB_SIZE:
    raise ConfigError(f"{source}: vocab_size must be {vocab.VOCAB_SIZE} (256 bytes + 4 specials), got "
                      f"{hf['vocab_size']}")
  if hf.get("patching_mode", "entropy") != "entropy" or not hf.get("patch_in_forward", True):
    raise ConfigError(f"{source}: patching_mode {hf.get('patching_mode')!r} / patch_in_forward "
                      f"{hf.get('patch_in_forward')!r}: only entropy patching in the forward pass is converted")
  if hf.get("monotonicity") or hf.get("patching_threshold_add"):
    raise ConfigError(f"{source}: monotonicity / patching_threshold_add are not used by transformers' BLT; refusing "
                      "a config that expects them")
  window = hf.get("local_attention_window_len", 512)
  sections = {name: _field(hf, name, source) for name in ("encoder_config", "decoder_config", "global_config",
                                                          "patcher_config")}
  encoder = _stack_config(sections["encoder_config"], f"{source}.encoder_config", window=window,
                          default_theta=500000.0)
  decoder = _stack_config(sections["decoder_config"], f"{source}.decoder_config", window=window,
                          default_theta=500000.0)
  global_hf = dict(sections["global_config"])
  global_stack = _stack_config(global_hf, f"{source}.global_config", window=None, default_theta=500000.0)
  patcher_hf = sections["patcher_config"]
  patcher = _stack_config(patcher_hf, f"{source}.patcher_config", window=patcher_hf.get("sliding_window"),
                          default_theta=10000.0)
  if encoder.d_model != decoder.d_model:
    raise ConfigError(f"{source}: encoder_config.hidden_size {encoder.d_model} != decoder_config.hidden_size "
                      f"{decoder.d_model} (transformers' BLT feeds encoder states to the decoder as they are)")
  q = int(hf.get("cross_attn_k", 2))
  for name in ("encoder_config", "decoder_config"):
    if int(sections[name].get("cross_attn_k", q)) != q:
      raise ConfigError(f"{source}.{name}.cross_attn_k differs from the top-level cross_attn_k {q}")
  entropy_config = ByteLMConfig(stack=patcher, max_seq_len=int(patcher_hf.get("max_position_embeddings", 8192)))
  threshold = hf.get("patching_threshold", 1.335442066192627)
  try:
    config = BLTConfig(
        encoder=encoder, global_stack=global_stack, decoder=decoder,
        patching=PatchingConfig("entropy", threshold=float(threshold), max_patch_length=hf.get("max_patch_length"),
                                bos_patch=True),
        hash_ngrams=tuple(hf.get("encoder_hash_byte_group_size") or (3, 4, 5, 6, 7, 8)),
        hash_buckets=int(hf.get("encoder_hash_byte_group_vocab", 500002)),
        hash_functions=int(hf.get("encoder_hash_byte_group_nb_functions", 1)), hash_function="reference",
        hash_embedding_sum="plain", queries_per_patch=q,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)), entropy_model_config=entropy_config,
        encoder_cross_every_layer=bool(sections["encoder_config"].get("cross_attn_all_layers", False)),
        decoder_cross_every_layer=bool(sections["decoder_config"].get("cross_attn_all_layers", True)),
        cross_residual="double", decoder_context="completed_patch",
        project_global_input=q * encoder.d_model != global_stack.d_model, project_decoder_input=False)
  except ConfigError as error:
    raise ConfigError(f"{source}: {error}") from None
  return config


def config_to_hf(config: BLTConfig) -> dict:
  """The transformers ``config.json`` dict of a reference-option ``BLTConfig`` (``check_exportable`` first)."""
  check_exportable(config)
  c = config

  def stack(s: TransformerConfig, **extra):
    return {"hidden_size": s.d_model, "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads,
            "num_hidden_layers": s.num_layers, "rms_norm_eps": s.norm_eps, "intermediate_size": s.mlp_hidden,
            "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": s.rope.rope_theta},
            **extra}

  q, e = c.queries_per_patch, c.entropy_model_config
  local = dict(cross_attn_k=q, hidden_size_global=c.global_stack.d_model, vocab_size=vocab.VOCAB_SIZE)
  return {
      "model_type": "blt", "architectures": ["BltForCausalLM"], "vocab_size": vocab.VOCAB_SIZE,
      "max_position_embeddings": c.max_seq_len, "patch_in_forward": True, "patching_mode": "entropy",
      "patching_threshold": c.patching.threshold, "max_patch_length": c.patching.max_patch_length,
      "local_attention_window_len": c.encoder.window, "cross_attn_k": q,
      "encoder_hash_byte_group_size": list(c.hash_ngrams), "encoder_hash_byte_group_vocab": c.hash_buckets,
      "encoder_hash_byte_group_nb_functions": c.hash_functions, "tie_word_embeddings": False,
      "encoder_config": stack(c.encoder, cross_attn_all_layers=c.encoder_cross_every_layer,
                              sliding_window=c.encoder.window, **local),
      "decoder_config": stack(c.decoder, cross_attn_all_layers=c.decoder_cross_every_layer, **local),
      "global_config": stack(c.global_stack),
      "patcher_config": stack(e.stack, sliding_window=e.stack.window, vocab_size=vocab.VOCAB_SIZE,
                              max_position_embeddings=e.max_seq_len),
  }


def check_exportable(config: BLTConfig):
  """Raises ``ConfigError`` naming the first field transformers' BLT cannot express."""
  c = config
  expected = dict(hash_function="reference", hash_embedding_sum="plain", cross_residual="double",
                  decoder_context="completed_patch", project_decoder_input=False,
                  project_global_input=c.queries_per_patch * c.encoder.d_model != c.global_stack.d_model)
  for field, value in expected.items():
    if getattr(c, field) != value:
      raise ConfigError(f"BLTConfig.{field}: transformers' BLT needs {value!r}, this model has "
                        f"{getattr(c, field)!r} (only models built with blt.reference_options export)")
  p = c.patching
  if p.patcher != "entropy" or p.monotonic_threshold is not None or not p.bos_patch or p.threshold is None:
    raise ConfigError("BLTConfig.patching: transformers' BLT needs entropy patching with a global threshold, "
                      f"bos_patch=True and no monotonic threshold; got {p}")
  if c.entropy_model_config is None:
    raise ConfigError("BLTConfig.entropy_model_config: unknown; the entropy model is part of the export")
  stacks = {"encoder": c.encoder, "decoder": c.decoder, "global_stack": c.global_stack,
            "entropy_model_config.stack": c.entropy_model_config.stack}
  for name, s in stacks.items():
    if s.head_dim * s.num_heads != s.d_model:
      raise ConfigError(f"BLTConfig.{name}.head_dim: transformers' BLT needs d_model / num_heads, got {s.head_dim}")
    if s.rope.rope_type != "default" or s.rope.partial_rotary_factor != 1.0:
      raise ConfigError(f"BLTConfig.{name}.rope: transformers' BLT needs plain full rope, got {s.rope}")
  if c.decoder.window != c.encoder.window or c.global_stack.window is not None:
    raise ConfigError("BLTConfig.decoder.window / global_stack.window: transformers' BLT uses the encoder's window "
                      "in the decoder and none in the global model")
  if c.entropy_model_config.tie_embeddings:
    raise ConfigError("BLTConfig.entropy_model_config.tie_embeddings: transformers' patcher has its own lm_head")


# --- Weights ----------------------------------------------------------------------------------------------

def _rope_permutation(head_dim: int) -> np.ndarray:
  """Our feature i (first half) / i + K/2 (second half) is transformers' feature 2i / 2i + 1."""
  return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How one of our variables is made from transformers tensors. ``layers``: the ``{i}`` of ``hf`` runs over
  that many layers and the results are stacked; ``to_ours`` maps one transformers tensor to our layout and
  ``to_hf`` back; both are exact (transposes, reshapes and permutations only)."""

  ours: str
  hf: str
  to_ours: object
  to_hf: object
  layers: int | None = None


def _linear_in_heads(heads, head_dim, permute=False):
  """``[heads * K, in]`` <-> ``[in, heads, K]`` (rope features permuted for queries and keys)."""
  perm = _rope_permutation(head_dim) if permute else np.arange(head_dim)
  inverse = np.argsort(perm)

  def to_ours(w):
    return w.T.reshape(w.shape[1], heads, head_dim)[:, :, perm]

  def to_hf(w):
    return w[:, :, inverse].reshape(w.shape[0], heads * head_dim).T

  return to_ours, to_hf


def _linear_out_heads(heads, head_dim):
  """``[out, heads * K]`` <-> ``[heads, K, out]``."""
  return (lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
          lambda w: w.reshape(heads * head_dim, w.shape[-1]).T)


def _transpose():
  return (lambda w: w.T, lambda w: w.T)


def _same():
  return (lambda w: w, lambda w: w)


def _split_out(groups, width):
  """``[groups * width, in]`` <-> ``[in, groups, width]`` (``in`` first)."""
  return (lambda w: w.T.reshape(w.shape[1], groups, width), lambda w: w.reshape(w.shape[0], groups * width).T)


def _split_in(groups, width):
  """``[out, groups * width]`` <-> ``[groups, width, out]``."""
  return (lambda w: w.T.reshape(groups, width, w.shape[0]), lambda w: w.reshape(groups * width, w.shape[-1]).T)


def _vocab_rows():
  table = np.asarray(vocab.reference_id_table())
  return (lambda w: w[table], lambda w: w[np.argsort(table)])


def _vocab_columns():
  """transformers' ``lm_head`` ``[260, D]`` <-> our ``[D, 260]`` in our id order."""
  table = np.asarray(vocab.reference_id_table())
  return (lambda w: w[table].T, lambda w: w.T[np.argsort(table)])


def _stack_rules(ours: str, hf: str, s: TransformerConfig) -> list[_Rule]:
  h, g, k = s.num_heads, s.num_kv_heads, s.head_dim
  layer = f"{hf}.layers.{{i}}"
  rules = [
      (f"{ours}.blocks.attention_norm.scale", f"{layer}.input_layernorm.weight", _same()),
      (f"{ours}.blocks.mlp_norm.scale", f"{layer}.post_attention_layernorm.weight", _same()),
      (f"{ours}.blocks.attention.wq", f"{layer}.self_attn.q_proj.weight", _linear_in_heads(h, k, permute=True)),
      (f"{ours}.blocks.attention.wk", f"{layer}.self_attn.k_proj.weight", _linear_in_heads(g, k, permute=True)),
      (f"{ours}.blocks.attention.wv", f"{layer}.self_attn.v_proj.weight", _linear_in_heads(g, k)),
      (f"{ours}.blocks.attention.wo", f"{layer}.self_attn.o_proj.weight", _linear_out_heads(h, k)),
      (f"{ours}.blocks.mlp.w_gate", f"{layer}.mlp.gate_proj.weight", _transpose()),
      (f"{ours}.blocks.mlp.w_up", f"{layer}.mlp.up_proj.weight", _transpose()),
      (f"{ours}.blocks.mlp.w_down", f"{layer}.mlp.down_proj.weight", _transpose()),
  ]
  return [_Rule(o, t, *fns, layers=s.num_layers) for o, t, fns in rules]


def _cross_rules(ours: str, hf: str, s: TransformerConfig, every_layer: bool) -> list[_Rule]:
  h, g, k = s.num_heads, s.num_kv_heads, s.head_dim
  layer = f"{hf}.cross_attn_layers.{{i}}" if every_layer else f"{hf}.cross_attn_layers.0"
  layers = s.num_layers if every_layer else None
  rules = [
      (f"{ours}.q_norm.scale", f"{layer}.q_norm.weight", _same()),
      (f"{ours}.kv_norm.scale", f"{layer}.k_norm.weight", _same()),
      (f"{ours}.wq", f"{layer}.q_proj.weight", _linear_in_heads(h, k)),
      (f"{ours}.wk", f"{layer}.k_proj.weight", _linear_in_heads(g, k)),
      (f"{ours}.wv", f"{layer}.v_proj.weight", _linear_in_heads(g, k)),
      (f"{ours}.wo", f"{layer}.o_proj.weight", _linear_out_heads(h, k)),
  ]
  return [_Rule(o, t, *fns, layers=layers) for o, t, fns in rules]


def weight_rules(config: BLTConfig) -> list[_Rule]:
  """Every variable of ``BLT(config)`` and the transformers tensor(s) it comes from."""
  c = config
  q, d_e, d_d = c.queries_per_patch, c.encoder.d_model, c.decoder.d_model
  rules = [
      _Rule("byte_embed.table", "model.local_encoder.embed_tokens.weight", *_vocab_rows()),
      _Rule("hash_table", "model.encoder_hash_tok_embedding.weight", *_same()),
      _Rule("query_init", "model.local_encoder.patch_embedding_projection.weight", *_split_out(q, d_e)),
      _Rule("global_out", "model.local_decoder.patch_embedding_projection.weight", *_split_out(q, d_d)),
      _Rule("final_norm.scale", "model.local_decoder.norm.weight", *_same()),
      _Rule("unembedding", "lm_head.weight", *_vocab_columns()),
      _Rule("entropy_lm.embed.table", "model.patcher.embed_tokens.weight", *_vocab_rows()),
      _Rule("entropy_lm.final_norm.scale", "model.patcher.norm.weight", *_same()),
      _Rule("entropy_lm.unembedding", "model.patcher.lm_head.weight", *_vocab_columns()),
  ]
  if c.project_global_input:
    rules.append(_Rule("global_in", "model.global_transformer.token_embedding_projection.weight",
                       *_split_in(q, d_e)))
  rules += _stack_rules("encoder", "model.local_encoder", c.encoder)
  rules += _stack_rules("global_stack", "model.global_transformer", c.global_stack)
  rules += _stack_rules("decoder", "model.local_decoder", c.decoder)
  rules += _stack_rules("entropy_lm.stack", "model.patcher", c.entropy_model_config.stack)
  rules += _cross_rules("encoder_cross", "model.local_encoder", c.encoder, c.encoder_cross_every_layer)
  rules += _cross_rules("decoder_cross", "model.local_decoder", c.decoder, c.decoder_cross_every_layer)
  return rules


def _hf_names(rule: _Rule) -> list[str]:
  return [rule.hf.format(i=i) for i in range(rule.layers)] if rule.layers is not None else [rule.hf]


# --- Files ------------------------------------------------------------------------------------------------

def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise ConfigError(f"{directory}: not a directory")
  if not os.path.isfile(path):
    raise ConfigError(f"{directory}: no {CONFIG_FILE}: not a Hugging Face model directory")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ConfigError(f"{path}: not valid JSON ({error})") from None


class _TensorFiles:
  """The tensors of a transformers directory (one safetensors file or a sharded index), read one at a time."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # imported here: only conversion needs it

    self._open = safe_open
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ConfigError(f"{index}: no weight_map")
      self.files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      path = os.path.join(directory, SINGLE_FILE)
      with safe_open(path, framework="np") as f:
        self.files = {name: path for name in f.keys()}
    else:
      raise ConfigError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    for path in set(self.files.values()):
      if not os.path.isfile(path):
        raise ConfigError(f"{directory}: the index names {os.path.basename(path)}, which is missing")

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    with self._open(self.files[name], framework="np") as f:
      return np.asarray(f.get_tensor(name), np.float32)


def _variables_like(config: BLTConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Our variable names -> abstract arrays (no memory), for shape checks and placement."""
  return _flat_state(nnx.state(nnx.eval_shape(lambda: BLT(config, rngs=nnx.Rngs(0)))))


def _path_name(path) -> str:
  """``encoder.blocks.attention.wq``: a state path as the variable names this module uses."""
  return ".".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _flat_state(state) -> dict:
  """Variable name -> ``nnx.Variable`` of a model state."""
  is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]}


def from_hf(directory: str, *, place=None) -> tuple[BLTConfig, dict]:
  """``(config, params)`` of a transformers BLT directory: ``params`` maps each of our variable names
  (``encoder.blocks.attention.wq``, ...) to a float32 array. ``place(name, array)`` (default: keep the numpy
  array) is called on each variable as soon as it is assembled, so only one variable lives on the host at a
  time when ``place`` moves it to devices (``load_hf_model`` puts it straight onto its sharding)."""
  config = config_from_hf(read_hf_config(directory), os.path.join(directory, CONFIG_FILE))
  files = _TensorFiles(directory)
  expected = _variables_like(config)
  rules = weight_rules(config)
  covered = {rule.ours for rule in rules}
  if covered != set(expected):  # our own bookkeeping: a rule for every variable, no more
    raise AssertionError(f"conversion rules and model variables differ: {sorted(covered ^ set(expected))}")
  wanted = {name for rule in rules for name in _hf_names(rule)}
  missing, extra = sorted(wanted - files.names()), sorted(files.names() - wanted)
  if missing:
    raise ConfigError(f"{directory}: missing tensor {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1
                      else f"{directory}: missing tensor {missing[0]}")
  if extra:
    raise ConfigError(f"{directory}: unexpected tensor {extra[0]} for this config"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  place = place or (lambda name, array: array)
  params = {}
  for rule in rules:
    shape = tuple(expected[rule.ours].shape)
    hf_shape = rule.to_hf(np.zeros(shape[1:] if rule.layers is not None else shape, np.float32)).shape
    parts = []
    for name in _hf_names(rule):
      tensor = files.get(name)
      if tensor.shape != hf_shape:
        raise ConfigError(f"{directory}: tensor {name} has shape {tensor.shape}, the config implies {hf_shape}")
      parts.append(rule.to_ours(tensor))
    array = np.stack(parts) if rule.layers is not None else parts[0]
    params[rule.ours] = place(rule.ours, np.ascontiguousarray(array, np.float32))
  return config, params


def to_hf_tensors(config: BLTConfig, params: dict) -> dict[str, np.ndarray]:
  """transformers tensor name -> float32 array, from our variables (exact inverse of ``from_hf``)."""
  check_exportable(config)
  tensors = {}
  for rule in weight_rules(config):
    if rule.ours not in params:
      raise ConfigError(f"variable {rule.ours} missing from the parameters to export")
    array = np.asarray(params[rule.ours], np.float32)
    names = _hf_names(rule)
    for i, name in enumerate(names):
      tensors[name] = np.ascontiguousarray(rule.to_hf(array[i] if rule.layers is not None else array))
  return tensors


def to_hf(config: BLTConfig, params: dict, directory: str):
  """Writes ``config.json`` and ``model.safetensors`` that transformers' ``BltForCausalLM`` loads."""
  from safetensors.numpy import save_file

  hf_config = config_to_hf(config)
  tensors = to_hf_tensors(config, params)
  with _atomic_directory(directory) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})


class _atomic_directory:
  """Write into a temporary sibling, rename onto ``directory`` when complete; nothing is left on failure."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)

  def __enter__(self):
    if os.path.exists(self.directory) and (not os.path.isdir(self.directory) or os.listdir(self.directory)):
      raise ConfigError(f"--out {self.directory}: exists and is not empty; choose a new directory")
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.directory)}.", dir=parent)
    return self.tmp

  def __exit__(self, kind, value, traceback):
    if kind is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    if os.path.isdir(self.directory):
      os.rmdir(self.directory)  # empty (checked on entry)
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(self.tmp):  # mkdtemp and safetensors create owner-only modes
      os.chmod(root, 0o777 & ~umask)
      for name in files:
        os.chmod(os.path.join(root, name), 0o666 & ~umask)
    os.rename(self.tmp, self.directory)
    return False


# --- Models and run directories -----------------------------------------------------------------------------

def _state_with(config: BLTConfig, params: dict):
  """A ``BLT`` whose variables are ``params`` (already placed arrays are kept where they are)."""
  abstract = nnx.eval_shape(lambda: BLT(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def fill(path, leaf):
    return leaf.replace(params[_path_name(path)])

  state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def load_hf_model(directory: str, *, mesh=None) -> BLT:
  """The ``BLT`` of a transformers BLT directory. With ``mesh`` every array goes straight onto the sharding its
  logical names give (``bytescale.parallel``): each device receives only its shard, built from one host copy of
  one variable at a time."""
  place = None
  if mesh is not None:
    from bytescale import parallel

    config = config_from_hf(read_hf_config(directory), os.path.join(directory, CONFIG_FILE))
    abstract = nnx.eval_shape(lambda: BLT(config, rngs=nnx.Rngs(0)))
    shardings = _flat_state(parallel.tree_shardings(nnx.state(abstract), mesh))

    def place(name, array):
      sharding = shardings[name].get_value() if isinstance(shardings[name], nnx.Variable) else shardings[name]
      return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  config, params = from_hf(directory, place=place)
  return _state_with(config, params)


def model_params(model: BLT) -> dict:
  """Our variable name -> array of a model (the inverse of ``_state_with``)."""
  return {name: leaf.get_value() for name, leaf in _flat_state(nnx.state(model)).items()}


def hf_to_run_directory(hf_directory: str, out: str, *, seq_len: int | None = None) -> dict:
  """An ordinary bytescale run directory (``checkpoints/0``: parameters, frozen entropy model, meta) made from a
  transformers BLT directory: ``bytescale eval`` / ``generate`` use it unchanged. Returns the meta written."""
  from bytescale.data.pipeline import DataConfig
  from bytescale.train.checkpoint import Checkpointer

  config, params = from_hf(hf_directory)
  model = _state_with(config, params)
  _, trainable, frozen = nnx.split(model, nnx.Param, ...)
  train_config = configs.TrainConfig(seq_len=seq_len or min(config.max_seq_len, 1024))
  meta = {"model": "blt", "preset": "hf", "model_config": configs.to_dict(config),
          "train_config": configs.to_dict(train_config), "data_config": dataclasses.asdict(DataConfig()),
          "init_from": None, "converted_from": os.path.abspath(hf_directory)}
  with _atomic_directory(out) as tmp:
    checkpointer = Checkpointer(os.path.join(tmp, "checkpoints"))
    checkpointer.save(0, {"params": trainable, "frozen": frozen}, meta=meta, force=True)
    checkpointer.close()
  return meta


def run_directory_to_hf(run_directory: str, out: str):
  """A bytescale BLT run directory (reference options) written back as a transformers BLT directory."""
  from bytescale.train.checkpoint import load_model

  model, meta = load_model(run_directory)
  if not isinstance(model, BLT):
    raise ConfigError(f"{run_directory}: holds a {meta.get('model')!r} model; only BLT exports to transformers")
  to_hf(model.config, model_params(model), out)
