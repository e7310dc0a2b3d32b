"""Analytic FLOPs per byte, component by component, in two conventions.

* ``"spacebyte"`` (SpaceByte's tables, used to compare with the papers): inference FLOPs = 2 x non-embedding
  multiply-adds; attention costs ``2 * W * D`` multiply-adds per layer per token over the whole window W (no
  causal halving); input embeddings excluded, the output projection included; training = 3 x inference.
* ``"exact"``: every matmul the model runs, counted as 2 FLOPs per multiply-add; causal attention over a
  context of T counts the ``(T+1)/2`` keys a query sees on average (a window caps it), i.e. what a
  block-skipping kernel computes. ``attention="dense"`` instead counts all T keys, which is what the plain XLA
  attention (``impl="xla"``) computes; that is the count compared with XLA's cost analysis in the tests.
  Training = forward + backward = 3 x forward.

Every count is per byte of input, for sequences of ``seq_len`` bytes. Hash-embedding lookups count zero.
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
  """Forward FLOPs per byte by component; ``training`` is 3x the forward total."""

  components: dict[str, float]

  @property
  def forward(self) -> float:
    return float(sum(self.components.values()))

  @property
  def training(self) -> float:
    return 3.0 * self.forward

  def scaled(self, factor: float, prefix: str = "") -> "FlopCount":
    return FlopCount({prefix + k: v * factor for k, v in self.components.items()})

  def __add__(self, other: "FlopCount") -> "FlopCount":
    merged = dict(self.components)
    for key, value in other.components.items():
      merged[key] = merged.get(key, 0.0) + value
    return FlopCount(merged)

  def as_dict(self) -> dict:
    return {"forward_per_byte": self.forward, "training_per_byte": self.training,
            "components": dict(self.components)}


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


def stack_flops(stack: TransformerConfig, context: int, *, convention="exact", attention="causal",
                prefix="") -> FlopCount:
  """Forward FLOPs per token of a TransformerStack run over sequences of ``context`` tokens."""
  _check(convention, attention)
  d, h, g, k, f = stack.d_model, stack.num_heads, stack.num_kv_heads, stack.head_dim, stack.mlp_hidden
  layers = stack.num_layers
  # SpaceByte's formula assumes square QKVO and a 2-matrix MLP of width e_ff*D; both conventions count our real
  # shapes (grouped KV heads, 3-matrix SwiGLU) and differ only in how attention over the context is counted.
  projections = 2 * d * k * (2 * h + 2 * g)
  keys = attended_keys(context, window=stack.window, convention=convention, attention=attention)
  attention_flops = 2 * 2 * h * k * keys  # scores q.k and the weighted sum of values
  mlp = 2 * 3 * d * f
  return FlopCount({
      prefix + "qkvo": layers * projections,
      prefix + "attention": layers * attention_flops,
      prefix + "mlp": layers * mlp,
  })


def bytelm_flops(config: ByteLMConfig, seq_len: int, *, convention="exact", attention="causal") -> FlopCount:
  count = stack_flops(config.stack, seq_len, convention=convention, attention=attention)
  return count + FlopCount({"unembed": 2.0 * config.stack.d_model * vocab.VOCAB_SIZE})


def megabyte_flops(config, seq_len: int, *, convention="exact", attention="causal") -> FlopCount:
  """Global model once per patch (amortised over P bytes), projection and local model once per byte.

  ``seq_len`` bytes occupy ``ceil((seq_len + 1) / P)`` patches (the pad patch shifts the global input by one).
  The local model attends within its patch (plus ``cross_patch_r`` slots of the previous one). Strided inference
  runs the model twice: double the result for it.
  """
  p = config.patch_size
  patches = -(-(seq_len + 1) // p)
  global_count = stack_flops(config.global_stack, patches, convention=convention, attention=attention,
                             prefix="global_").scaled(1.0 / p)
  local_context = p + config.cross_patch_r
  local_count = stack_flops(config.local_stack, local_context, convention=convention, attention=attention,
                            prefix="local_")
  d_local = config.local_stack.d_model
  extra = FlopCount({
      "global_to_local": 2.0 * config.d_global_embed * d_local,
      "unembed": 2.0 * d_local * vocab.VOCAB_SIZE,
  })
  return global_count + local_count + extra


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
  """FLOPs of ``jax.jit(fn)(*args)`` according to XLA's cost analysis of the compiled program.

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
  p.add_argument("--patch-size", type=int, default=None, help="override the patch size (patch models)")
  p.add_argument("--convention", choices=CONVENTIONS, default="exact")
  p.add_argument("--attention", choices=ATTENTION_COUNTS, default="causal")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
  return "flops", _run


def _run(args):
  from bytescale import configs

  config = configs.get_preset(args.model, args.preset)
  if args.patch_size is not None:
    config = configs.replace_path(config, "patch_size", str(args.patch_size))
  for assignment in args.set:
    key, _, value = assignment.partition("=")
    config = configs.replace_path(config, key, value)
  seq_len = args.seq_len or getattr(config, "max_seq_len", 1024)
  count = flops_per_byte(config, seq_len, convention=args.convention, attention=args.attention)
  if args.json:
    print(json.dumps({"model": args.model, "preset": args.preset, "seq_len": seq_len,
                      "convention": args.convention, **count.as_dict()}))
    return
  print(f"{args.model}/{args.preset}  seq_len={seq_len}  convention={args.convention}")
  for name, value in sorted(count.components.items()):
    print(f"  {name:<28} {value:>16,.0f}")
  print(f"  {'forward per byte':<28} {count.forward:>16,.0f}\n  {'training per byte':<28} {count.training:>16,.0f}")
