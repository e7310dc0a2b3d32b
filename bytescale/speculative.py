"""Greedy self-speculative (blockwise parallel) decoding, written against the protocol (no model names).

A model that drafts (``bytescale.heads.MultiTokenLM``; any model offering the same methods) has, beside the
model protocol of ``bytescale.models.base``:

* ``init_cache(batch, max_len, drafting=True)``: a cache that also keeps the drafting state;
* ``draft(cache, next_B) -> (drafts_BxJ, cache)``: given the cached positions and the greedy byte after them,
  proposes the J following bytes.

Each step feeds the block ``[next, draft_1 .. draft_J]`` (N = J + 1 bytes per row) through ONE ``decode``. Its
next-byte logits at block position i are exactly what plain greedy decoding sees there if the block's first
i+1 bytes are the greedy ones; so draft i+1 is accepted while it equals the greedy byte after position i, and
the step emits the greedy bytes at every accepted position plus the one after them: 1 to N bytes. The caches
roll back past the rejected bytes (``rollback`` with a per-row count: rows accept different numbers). The
output is byte-for-byte the output of ``bytescale.generate.generate`` at temperature 0: only verified bytes
are ever emitted.

The first byte comes from the prefill forward; "bytes per forward" counts it (prefill + verification steps),
so plain greedy decoding scores 1.0.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bytescale import vocab
from bytescale.generate import NEVER_SAMPLED, decode_rows, frame_prompts


_ALLOWED_V = np.isin(np.arange(vocab.VOCAB_SIZE), NEVER_SAMPLED, invert=True)


def greedy_ids(logits_xV):
  """Argmax over the ids generation may produce: exactly the ids of ``generate`` at temperature 0 (which
  removes the same ids with a scatter; a ``where`` is cheaper inside a decoding loop)."""
  return jnp.argmax(jnp.where(_ALLOWED_V, logits_xV.astype(jnp.float32), -jnp.inf), axis=-1).astype(jnp.int32)


def accepted_lengths(drafts_BxJ, greedy_BxN):
  """Block bytes that were valid inputs: 1 (the known next byte) + the longest prefix of drafts where draft i
  equals the greedy byte after block position i."""
  matches_BxJ = (drafts_BxJ == greedy_BxN[:, :-1]).astype(jnp.int32)
  return 1 + jnp.sum(jnp.cumprod(matches_BxJ, axis=1), axis=1)


def cache_length(prompt_len: int, max_new: int, block: int) -> int:
  """Cache slots needed: a finished row may still run one block past its last kept byte."""
  return prompt_len + max_new + 2 * block + 1


def make_speculative_decoder(graphdef, max_new: int, max_len: int):
  """A jitted ``run(params, prompt_BxP, lengths_B) -> (tokens_BxM, forwards_B, steps)``: M = ``max_new`` greedy
  bytes per row, each row's model forwards (prefill included) and the number of verification steps run."""

  @jax.jit
  def run(params, prompt_BxP, lengths_B):
    model = nnx.merge(graphdef, params)
    batch, width = prompt_BxP.shape
    rows = jnp.arange(batch)
    cache = model.init_cache(batch, max_len, drafting=True)
    out, cache = model.decode(cache, prompt_BxP)
    cache = model.rollback(cache, width - lengths_B)
    next_B = greedy_ids(out.logits_BxTxV[rows, lengths_B - 1])
    drafts_BxJ, cache = model.draft(cache, next_B)
    block = drafts_BxJ.shape[1] + 1
    tokens = jnp.zeros((batch, max_new + 2 * block), jnp.int32).at[:, 0].set(next_B)
    count_B = jnp.ones((batch,), jnp.int32)
    forwards_B = jnp.ones((batch,), jnp.int32)

    def step(carry):
      cache, next_B, drafts_BxJ, tokens, count_B, forwards_B, steps = carry
      active_B = count_B < max_new
      block_BxN = jnp.concatenate([next_B[:, None], drafts_BxJ], axis=1)
      out, cache = model.decode(cache, block_BxN)
      greedy_BxN = greedy_ids(out.logits_BxTxV)
      accepted_B = jnp.where(active_B, accepted_lengths(drafts_BxJ, greedy_BxN), 0)
      # The greedy bytes after block positions 0..k-1 are the k new bytes (accepted drafts equal them).
      written = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice_in_dim(row, new, at, axis=0))(
          tokens, greedy_BxN, count_B)
      tokens = jnp.where(active_B[:, None], written, tokens)
      cache = model.rollback(cache, block - accepted_B)
      next_B = jnp.where(active_B, greedy_BxN[rows, jnp.maximum(accepted_B - 1, 0)], next_B)
      new_drafts_BxJ, cache = model.draft(cache, next_B)
      drafts_BxJ = jnp.where(active_B[:, None], new_drafts_BxJ, drafts_BxJ)
      return (cache, next_B, drafts_BxJ, tokens, count_B + accepted_B, forwards_B + active_B, steps + 1)

    carry = (cache, next_B, drafts_BxJ, tokens, count_B, forwards_B, jnp.zeros((), jnp.int32))
    carry = jax.lax.while_loop(lambda c: jnp.any(c[4] < max_new), step, carry)
    return carry[3][:, :max_new], carry[5], carry[6]

  return run


@dataclasses.dataclass
class SpeculativeResult:
  texts: list[bytes]  # the new bytes per prompt (cut at EOS if asked)
  tokens: np.ndarray  # BxM ids, uncut
  forwards: np.ndarray  # model forwards per row, prefill included
  steps: int  # verification steps run for the whole batch
  seconds: float  # execution time (compilation excluded)
  compile_seconds: float

  @property
  def bytes_per_forward(self) -> float:
    """Mean over rows of generated bytes per forward of that row (plain greedy: 1.0)."""
    return float(np.mean(self.tokens.shape[1] / self.forwards))

  @property
  def bytes_per_second(self) -> float:
    return self.tokens.size / self.seconds


_COMPILED: dict = {}  # compiled decoders by model structure and argument shapes


def _shapes(args) -> str:
  return str(jax.tree.map(lambda a: (a.shape, a.dtype), args))


def _compiled(graphdef, max_new: int, max_len: int, args):
  """The compiled decoder, reused across calls with the same model structure and shapes."""
  key = ("speculative", graphdef, max_new, max_len, _shapes(args))
  if key not in _COMPILED:
    _COMPILED[key] = make_speculative_decoder(graphdef, max_new, max_len).lower(*args).compile()
  return _COMPILED[key]


def speculative_generate(model, prompts: list[bytes], max_new_bytes: int, *,
                         stop_at_eos: bool = True) -> SpeculativeResult:
  """Greedy continuation of every prompt, ``max_new_bytes`` each, drafted by the model's heads."""
  if max_new_bytes < 1:
    raise ValueError(f"max_new_bytes must be >= 1, got {max_new_bytes}")
  if not callable(getattr(model, "draft", None)):
    raise ValueError(f"{type(model).__name__} has no draft heads; train with --set mtp_heads=N for speculative "
                     "decoding")
  ids, lengths = frame_prompts(prompts)
  graphdef, params = nnx.split(model)
  block = getattr(model, "num_heads", 1)
  args = (params, jnp.asarray(ids), jnp.asarray(lengths))
  tick = time.perf_counter()
  compiled = _compiled(graphdef, max_new_bytes, cache_length(ids.shape[1], max_new_bytes, block), args)
  compile_seconds = time.perf_counter() - tick
  tick = time.perf_counter()
  tokens, forwards, steps = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - tick
  tokens = np.asarray(tokens)
  texts = decode_rows(tokens, stop_at_eos=stop_at_eos)
  return SpeculativeResult(texts, tokens, np.asarray(forwards), int(steps), seconds, compile_seconds)


def greedy_tokens(model, prompts: list[bytes], max_new_bytes: int):
  """Plain greedy decoding (``bytescale.generate``'s sampler at temperature 0): ``(tokens_BxM, seconds)`` with
  compilation excluded, for side-by-side timing."""
  from bytescale.generate import SamplingConfig, make_sampler

  ids, lengths = frame_prompts(prompts)
  graphdef, params = nnx.split(model)
  args = (params, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0))
  key = ("greedy", graphdef, max_new_bytes, _shapes(args))
  if key not in _COMPILED:
    run = make_sampler(graphdef, max_new_bytes, SamplingConfig(temperature=0.0), ids.shape[1] + max_new_bytes)
    _COMPILED[key] = run.lower(*args).compile()
  compiled = _COMPILED[key]
  tick = time.perf_counter()
  tokens = jax.block_until_ready(compiled(*args))
  return np.asarray(tokens), time.perf_counter() - tick
