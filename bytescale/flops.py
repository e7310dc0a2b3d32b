"""Analytic FLOPs per byte, component by component, in two conventions.

* ``"spacebyte"`` (SpaceByte's tables, used to compare with the papers): inference FLOPs = 2 x non-embedding
  multiply-adds; attention costs ``2 * W * D`` multiply-adds per layer per token over the whole window W (no
  causal halving); input embeddings excluded, the output projection included; training = 3 x inference.
  MegaByte's patches are counted as ``T / P`` (the paper's formula), not padded.
* ``"exact"``: every matmul the model runs, counted as 2 FLOPs per multiply-add; causal attention over a
  context of T counts the keys a query sees on average (``(T+1)/2``, capped by a window), i.e. what a
  block-skipping kernel computes. ``attention="dense"`` instead counts every score the XLA attention path
  (``impl="xla"``) computes: the whole score matrix of a row that fits one block, else the ``C x C`` blocks
  ``blocked_packed_attention`` visits (``xla_keys``); that is the count compared with XLA's cost analysis in the
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

from bytescale.configs import TransformerConfig
from bytescale.ops.attention import packed_block_size, unrolled_block_loops

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


def check_convention(convention: str, attention: str):
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  if attention not in ATTENTION_COUNTS:
    raise ValueError(f"attention must be one of {ATTENTION_COUNTS}, got {attention!r}")


def attended_keys(context: int, *, window: int | None, convention: str, attention: str) -> float:
  """Average number of keys one query attends to in a causal sequence of ``context`` tokens (for ``"dense"``:
  the keys whose scores the XLA path computes, see :func:`xla_keys`)."""
  span = context if window is None else min(window, context)
  if convention == "spacebyte":
    return float(span)
  if attention == "dense":
    return xla_keys(int(round(context)), window)
  if window is None or window >= context:
    return (context + 1) / 2
  # Queries before the window fills see t+1 keys, later ones see `window`.
  filling = window * (window + 1) / 2
  return (filling + (context - window) * window) / context


def xla_keys(context: int, window: int | None) -> float:
  """Keys per query whose scores the XLA path computes for a packed row of ``context`` tokens (every stack of
  every model runs packed rows): all ``context`` when the row fits one block, else the ``C x C`` blocks
  ``ops.attention.blocked_packed_attention`` visits, padding queries included, per real query."""
  block = packed_block_size(context, window)
  if context <= block:
    return float(context)
  n = -(-context // block)
  max_d = n - 1 if window is None else min(n - 1, (window + block - 2) // block)
  block_pairs = sum(n - d for d in range(max_d + 1))
  return block_pairs * block * block / context


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
  check_convention(convention, attention)
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


def xla_flops(fn, *args) -> float:
  """FLOPs of ``jax.jit(fn)(*args)`` according to XLA's cost analysis of the compiled program (compiled, not
  run: ``args`` may be ``jax.ShapeDtypeStruct``s).

  XLA counts the body of a loop once, whatever its trip count: compare models built with
  ``scan_layers=False``; attention's loops over blocks are unrolled here (``unrolled_block_loops``).
  """
  import jax

  with unrolled_block_loops():  # a fresh function: a trace of ``fn`` cached outside the context is not reused
    analysis = jax.jit(lambda *a: fn(*a)).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis["flops"])
