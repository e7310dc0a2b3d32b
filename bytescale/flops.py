"""Analytic FLOPs per byte, component by component, in two conventions.

* ``"spacebyte"`` (SpaceByte's tables, used to compare with the papers): inference FLOPs = 2 x non-embedding
  multiply-adds; attention costs ``2 * W * D`` multiply-adds per layer per token over the whole window W (no
  causal halving); input embeddings excluded, the output projection included; training = 3 x inference.
  MegaByte's patches are counted as ``T / P`` (the paper's formula), not padded.
* ``"exact"``: every matmul the model runs, counted as 2 FLOPs per multiply-add; causal attention over a
  context of T counts the keys a query sees on average (``(T+1)/2``, capped by a window), i.e. what a
  block-skipping kernel computes. ``attention="dense"`` instead counts every key of the score matrix the plain
  XLA attention (``impl="xla"``) materialises; that is the count compared with XLA's cost analysis in the
  tests. Shapes are the ones the model runs (MegaByte's padded patches, BLT's ``max_patches`` slots when dense).

Training (``FlopCount.training``, model FLOPs) = forward + backward = 3 x forward in both conventions, except for a
frozen part (BLT's entropy model, only when asked for): forward only. ``FlopCount.training_with_recompute`` adds
the forward work that rematerialisation repeats (``TransformerConfig.remat``, the multi-token heads'
memory-efficient loss): what the compiled training step runs.

Elementwise work (norms, softmax, RoPE, residuals) is not counted in either convention: XLA's cost analysis
counts it, a few percent of the total at realistic head dims. Every count is per byte of input, for sequences
of ``seq_len`` bytes. Embedding and hash-embedding lookups count zero.
"""

from __future__ import annotations

import dataclasses
import json

from bytescale import vocab
from bytescale.configs import ByteLMConfig, TransformerConfig

CONVENTIONS = ("spacebyte", "exact")
ATTENTION_COUNTS = ("causal", "dense")


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs per byte by component, and the training FLOPs they imply.

  ``training`` (model FLOPs, what FLOP-matched comparisons and MFU use): forward + backward, the backward pass
  costing twice the forward, except for ``frozen`` FLOPs (no gradient flows into them: forward only).
  ``training_with_recompute`` (what the hardware runs) adds the ``recomputed`` FLOPs: the forward work that
  rematerialisation repeats in the backward pass. ``frozen`` and ``recomputed`` map component names to FLOPs
  per byte (at most the component's forward FLOPs); names missing from them have none.
  """

  components: dict[str, float]
  frozen: dict[str, float] = dataclasses.field(default_factory=dict)
  recomputed: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def forward(self) -> float:
    return float(sum(self.components.values()))

  @property
  def training(self) -> float:
    return 3.0 * self.forward - 2.0 * float(sum(self.frozen.values()))

  @property
  def training_with_recompute(self) -> float:
    return self.training + float(sum(self.recomputed.values()))

  def scaled(self, factor: float, prefix: str = "") -> "FlopCount":
    rename = lambda values: {prefix + k: v * factor for k, v in values.items()}  # noqa: E731
    return FlopCount(rename(self.components), rename(self.frozen), rename(self.recomputed))

  def as_frozen(self) -> "FlopCount":
    """The same count for a frozen model (forward only in training, nothing recomputed)."""
    return FlopCount(dict(self.components), dict(self.components))

  def with_recomputed(self, names, fraction: float = 1.0) -> "FlopCount":
    """The same count with ``fraction`` of the forward FLOPs of the components ``names`` recomputed in the
    backward pass."""
    recomputed = dict(self.recomputed)
    recomputed.update({name: fraction * self.components[name] for name in names})
    return FlopCount(dict(self.components), dict(self.frozen), recomputed)

  def __add__(self, other: "FlopCount") -> "FlopCount":
    def merge(a, b):
      merged = dict(a)
      for key, value in b.items():
        merged[key] = merged.get(key, 0.0) + value
      return merged

    return FlopCount(merge(self.components, other.components), merge(self.frozen, other.frozen),
                     merge(self.recomputed, other.recomputed))

  def as_dict(self) -> dict:
    return {"forward_per_byte": self.forward, "training_per_byte": self.training,
            "training_with_recompute_per_byte": self.training_with_recompute, "components": dict(self.components)}


def _check(convention: str, attention: str):
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  if attention not in ATTENTION_COUNTS:
    raise ValueError(f"attention must be one of {ATTENTION_COUNTS}, got {attention!r}")


def attended_keys(context: int, *, window: int | None, convention: str, attention: str) -> float:
  """Average number of keys one query attends to in a causal sequence of ``context`` tokens."""
  span = context if window is None else min(window, context)
  if convention == "spacebyte" or attention == "dense":
    return float(context if convention == "exact" else span)
  if window is None or window >= context:
    return (context + 1) / 2
  # Queries before the window fills see t+1 keys, later ones see `window`.
  filling = window * (window + 1) / 2
  return (filling + (context - window) * window) / context


def remat_recomputed(stack: TransformerConfig) -> dict[str, float]:
  """Which fraction of each ``stack_flops`` component the backward pass recomputes under ``stack.remat``.

  ``full`` saves only each layer's input, and the recomputation stops at what the backward pass reads: every
  matmul but the MLP's output projection (its product is the layer's output; a matmul's backward reads only its
  inputs), i.e. 2 of the MLP's 3 matrices. ``dots`` saves every matmul's product; ``dots_no_batch`` saves the
  projections and the MLP (no batch dimensions) and recomputes the attention scores and weighted sums.
  """
  return {"none": {}, "dots": {}, "dots_no_batch": {"attention": 1.0},
          "full": {"qkvo": 1.0, "attention": 1.0, "mlp": 2.0 / 3.0}}[stack.remat]


def stack_flops(stack: TransformerConfig, context: float, *, convention="exact", attention="causal", prefix="",
                keys: float | None = None) -> FlopCount:
  """Forward FLOPs per token of a TransformerStack run over sequences of ``context`` tokens.

  ``keys`` overrides the keys each query attends to (for callers whose masks are not a plain causal window).
  What ``stack.remat`` recomputes is marked ``recomputed``.
  """
  _check(convention, attention)
  d, h, g, k, f = stack.d_model, stack.num_heads, stack.num_kv_heads, stack.head_dim, stack.mlp_hidden
  layers = stack.num_layers
  # SpaceByte's formula assumes square QKVO and a 2-matrix MLP of width e_ff*D; both conventions count our real
  # shapes (grouped KV heads, 3-matrix SwiGLU) and differ only in how attention over the context is counted.
  projections = 2 * d * k * (2 * h + 2 * g)
  if keys is None:
    keys = attended_keys(context, window=stack.window, convention=convention, attention=attention)
  attention_flops = 2 * 2 * h * k * keys  # scores q.k and the weighted sum of values
  mlp = 2 * 3 * d * f
  count = FlopCount({
      prefix + "qkvo": layers * projections,
      prefix + "attention": layers * attention_flops,
      prefix + "mlp": layers * mlp,
  })
  for name, fraction in remat_recomputed(stack).items():
    count = count.with_recomputed([prefix + name], fraction)
  return count


def bytelm_flops(config: ByteLMConfig, seq_len: int, *, convention="exact", attention="causal") -> FlopCount:
  count = stack_flops(config.stack, seq_len, convention=convention, attention=attention)
  return count + FlopCount({"unembed": 2.0 * config.stack.d_model * vocab.VOCAB_SIZE})


def _local_keys(patch_size: int, cross_patch_r: int, window: int | None, *, convention: str, attention: str):
  """Keys per query of MegaByte's local model: in-patch position i sees ``r + i + 1`` keys (causal), out of the
  ``r + P`` a dense score matrix holds."""
  span = patch_size + cross_patch_r
  if convention == "spacebyte":
    return float(span if window is None else min(window, span))
  if attention == "dense":
    return float(span)
  seen = [cross_patch_r + i + 1 for i in range(patch_size)]
  return sum(s if window is None else min(s, window) for s in seen) / patch_size


def megabyte_flops(config, seq_len: int, *, convention="exact", attention="causal") -> FlopCount:
  """Global model once per patch, projection and local model once per local position, unembedding per byte.

  Exact: ``seq_len`` bytes fill ``J = ceil((seq_len + 1) / P) * P`` local positions (the pad patch shifts the
  global input by one, rows are padded to whole patches) and ``J / P`` global positions, so a row of a whole
  number of patches pays for one more patch. SpaceByte: ``T / P`` patches, the paper's formula. The local model
  attends within its patch (plus ``cross_patch_r`` positions of the previous one). With ``strided_inference``
  the forward pass runs a second pass over the row shifted by ``P // 2``; it is counted in the same components.
  """
  from bytescale.ops.patches import num_local_positions

  _check(convention, attention)
  p = config.patch_size
  local = config.local_stack
  d_local = local.d_model
  local_keys = _local_keys(p, config.cross_patch_r, local.window, convention=convention, attention=attention)
  count = FlopCount({"unembed": 2.0 * d_local * vocab.VOCAB_SIZE * len(config.stream_offsets)})
  for offset in config.stream_offsets:
    stream = seq_len + offset
    positions = num_local_positions(stream, p) if convention == "exact" else stream
    patches = positions / p
    count += stack_flops(config.global_stack, patches, convention=convention, attention=attention,
                         prefix="global_").scaled(patches / seq_len)
    count += stack_flops(local, p, convention=convention, attention=attention, prefix="local_",
                         keys=local_keys).scaled(positions / seq_len)
    count += FlopCount({"global_to_local": 2.0 * config.d_global_embed * d_local * positions / seq_len})
  return count


def entropy_model_flops(entropy_config: ByteLMConfig, seq_len: int, *, context: int | None = None,
                        overlap: int | None = None, convention="exact", attention="causal",
                        prefix="entropy_model.") -> FlopCount:
  """FLOPs per byte of a frozen entropy model (BLT's patcher) scoring ``seq_len`` bytes, forward only.

  A row longer than ``context`` (default: the model's ``max_seq_len``) is scored in overlapping windows of
  ``context`` bytes (``bytescale.entropy.window_layout``): each window is a full forward pass.
  """
  from bytescale.entropy import window_layout

  context = context or entropy_config.max_seq_len
  starts, _ = window_layout(seq_len, context, overlap)
  window = seq_len if len(starts) == 1 else context
  count = bytelm_flops(entropy_config, window, convention=convention, attention=attention)
  return count.scaled(len(starts) * window / seq_len, prefix).as_frozen()


# Each model registers how its FLOPs are counted: {config type: fn(config, seq_len, convention, attention)}.
FLOP_COUNTERS = {ByteLMConfig: bytelm_flops}


def _register_builtin_counters():
  from bytescale.models.megabyte import MegaByteConfig

  FLOP_COUNTERS.setdefault(MegaByteConfig, megabyte_flops)


def register_flop_counter(config_type, fn):
  FLOP_COUNTERS[config_type] = fn


def flops_per_byte(config, seq_len: int, *, convention="exact", attention="causal") -> FlopCount:
  """FLOPs per byte of any registered model config."""
  _register_builtin_counters()
  for config_type, fn in FLOP_COUNTERS.items():
    if isinstance(config, config_type):
      return fn(config, seq_len, convention=convention, attention=attention)
  raise ValueError(f"no FLOP counter registered for {type(config).__name__}")


def xla_flops(fn, *args) -> float:
  """FLOPs of ``jax.jit(fn)(*args)`` according to XLA's cost analysis of the compiled program (compiled, not
  run: ``args`` may be ``jax.ShapeDtypeStruct``s).

  XLA counts the body of a loop once, whatever its trip count: compare models built with
  ``scan_layers=False``.
  """
  import jax

  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis["flops"])


# --- CLI: bytescale flops -----------------------------------------------------------------------------------

def add_command(subparsers):
  p = subparsers.add_parser("flops", help="analytic FLOPs per byte of a model preset, by component")
  p.add_argument("--model", default="bytelm")
  p.add_argument("--preset", default="tiny")
  p.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default: the preset's max_seq_len)")
  p.add_argument("--patch-size", type=float, default=None,
                 help="MegaByte: the patch size; BLT: the average patch size to count for (default: the stride for "
                      "strided patching, else 4.5)")
  p.add_argument("--convention", choices=CONVENTIONS, default="exact")
  p.add_argument("--attention", choices=ATTENTION_COUNTS, default="causal")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="model config override; mtp_heads=N (and other mtp_* fields) add multi-token heads")
  p.add_argument("--entropy-model-preset", default=None, metavar="PRESET",
                 help="BLT with entropy patching: also count this bytelm preset as its (frozen) entropy model, "
                      "e.g. entropy-100m (the paper's); reported as entropy_model.* components")
  p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
  return "flops", _run


def configured_count(model: str, preset: str, *, seq_len: int | None = None, patch_size: float | None = None,
                     overrides=(), convention: str = "exact", attention: str = "causal",
                     entropy_model_preset: str | None = None) -> tuple[int, FlopCount]:
  """What ``bytescale flops`` prints: ``(seq_len, count)`` for a preset with ``--set``-style overrides."""
  from bytescale import configs, heads
  from bytescale.models.blt import BLTConfig
  from bytescale.models.blt import flops_per_byte as blt_flops

  config = configs.get_preset(model, preset)
  assignments, multi_token = heads.split_overrides(overrides)
  if assignments:
    config = configs.replace_paths(config, assignments)
  average_patch_size = None
  if patch_size is not None:
    if isinstance(config, BLTConfig):
      if patch_size < 1:
        raise configs.ConfigError(f"--patch-size must be at least 1 byte, got {patch_size}")
      average_patch_size = float(patch_size)
    elif float(patch_size).is_integer():
      config = configs.replace_path(config, "patch_size", str(int(patch_size)))
    else:
      raise configs.ConfigError(f"--patch-size {patch_size}: {type(config).__name__} needs a whole number of bytes")
  if multi_token:
    if average_patch_size is not None:
      raise configs.ConfigError("--patch-size with mtp_* overrides on BLT is not supported; count BLT with heads at "
                                "its default average patch size, or drop the heads")
    config = heads.apply_overrides(config, multi_token)
  seq_len = seq_len or getattr(config, "max_seq_len", None) or getattr(
      getattr(config, "trunk", None), "max_seq_len", 1024)
  if entropy_model_preset is not None:
    if not isinstance(config, BLTConfig) or not config.patching.needs_entropies:
      raise configs.ConfigError("--entropy-model-preset applies to BLT with entropy patching only")
    config = dataclasses.replace(config, entropy_model_config=configs.get_preset("bytelm", entropy_model_preset))
  if isinstance(config, BLTConfig):  # BLT alone takes a (fractional) average patch size
    count = blt_flops(config, seq_len, average_patch_size, convention=convention, attention=attention,
                      include_entropy_model=entropy_model_preset is not None)
  else:
    count = flops_per_byte(config, seq_len, convention=convention, attention=attention)
  return seq_len, count


def _run(args):
  seq_len, count = configured_count(args.model, args.preset, seq_len=args.seq_len, patch_size=args.patch_size,
                                    overrides=args.set, convention=args.convention, attention=args.attention,
                                    entropy_model_preset=args.entropy_model_preset)
  if args.json:
    print(json.dumps({"model": args.model, "preset": args.preset, "seq_len": seq_len, "patch_size": args.patch_size,
                      "overrides": args.set, "convention": args.convention, "attention": args.attention,
                      **count.as_dict()}))
    return
  print(f"{args.model}/{args.preset}  seq_len={seq_len}  convention={args.convention}  attention={args.attention}")
  for name, value in sorted(count.components.items()):
    print(f"  {name:<28} {value:>16,.0f}")
  print(f"  {'forward per byte':<28} {count.forward:>16,.0f}\n  {'training per byte':<28} {count.training:>16,.0f}")
  if count.training_with_recompute != count.training:
    print(f"  {'  with remat recompute':<28} {count.training_with_recompute:>16,.0f}")
