"""Sampling with the KV cache, written against the model protocol only (see ``bytescale.models.base``).

Prompts of different lengths share one batch: they are right-padded, prefilled together, then each row's
cache is rolled back to its own length, so the next byte is sampled from each row's last real position.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bytescale import vocab
from bytescale.ops.sampling import allowed_logits

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """``temperature == 0`` is greedy; ``top_k`` keeps the k likeliest ids; ``top_p`` the smallest nucleus."""

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k is not None and not 1 <= self.top_k <= vocab.VOCAB_SIZE:
      raise ValueError(f"SamplingConfig.top_k must be in [1, {vocab.VOCAB_SIZE}], got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits_BxV, rng, sampling: SamplingConfig):
  logits = allowed_logits(logits_BxV)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k is not None:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep every id whose preceding cumulative mass is below top_p (the top id is always kept).
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def frame_prompts(prompts: list[bytes]):
  """``[BOS] + prompt`` per row, right-padded with PAD; returns ``(ids_BxP, lengths_B)``."""
  rows = [[vocab.BOS] + list(p) for p in prompts]
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), vocab.PAD, np.int32)
  for i, r in enumerate(rows):
    ids[i, : len(r)] = r
  return ids, np.array([len(r) for r in rows], np.int32)


def prefill(model, prompt_BxP, lengths_B, max_len: int):
  """Runs the prompts through a fresh cache; returns ``(cache, last_logits_BxV, last_hidden_BxD)``."""
  cache = model.init_cache(prompt_BxP.shape[0], max_len)
  out, cache = model.decode(cache, prompt_BxP)
  cache = model.rollback(cache, prompt_BxP.shape[1] - lengths_B)
  last = (lengths_B - 1)[:, None, None]
  logits = jnp.take_along_axis(out.logits_BxTxV, last, axis=1)[:, 0]
  hidden = jnp.take_along_axis(out.hidden_BxTxD, last, axis=1)[:, 0]
  return cache, logits, hidden


def make_sampler(graphdef, max_new: int, sampling: SamplingConfig, max_len: int):
  @jax.jit
  def run(params, prompt_BxP, lengths_B, rng):
    model = nnx.merge(graphdef, params)
    cache, logits, _ = prefill(model, prompt_BxP, lengths_B, max_len)

    def body(i, carry):
      cache, logits, rng, out_BxN = carry
      rng, key = jax.random.split(rng)
      token_B = sample_logits(logits, key, sampling)
      out_BxN = out_BxN.at[:, i].set(token_B)
      step_out, cache = model.decode(cache, token_B[:, None])
      return cache, step_out.logits_BxTxV[:, 0], rng, out_BxN

    out_BxN = jnp.zeros((prompt_BxP.shape[0], max_new), jnp.int32)
    return jax.lax.fori_loop(0, max_new, body, (cache, logits, rng, out_BxN))[3]

  return run


# Repeated generate() calls with the same model structure, lengths and sampling reuse one compiled sampler
# (graph definitions and sampling configs are hashable; the parameters are arguments, not constants).
_cached_sampler = functools.lru_cache(maxsize=16)(make_sampler)


def generate(model, prompts: list[bytes], max_new_bytes: int, *, sampling=SamplingConfig(), seed: int = 0,
             stop_at_eos: bool = True) -> list[bytes]:
  """Samples ``max_new_bytes`` after each prompt; returns the new bytes (cut at EOS if ``stop_at_eos``)."""
  if max_new_bytes < 1:
    raise ValueError(f"max_new_bytes must be >= 1, got {max_new_bytes}")
  ids, lengths = frame_prompts(prompts)
  graphdef, params = nnx.split(model)
  sampler = _cached_sampler(graphdef, max_new_bytes, sampling, ids.shape[1] + max_new_bytes)
  tokens = np.asarray(sampler(params, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed)))
  return decode_rows(tokens, stop_at_eos=stop_at_eos)


def decode_rows(tokens_BxN, *, stop_at_eos: bool) -> list[bytes]:
  """Generated ids per row as bytes, cut at the first EOS if ``stop_at_eos``."""
  results = []
  for row in np.asarray(tokens_BxN).tolist():
    if stop_at_eos and vocab.EOS in row:
      row = row[: row.index(vocab.EOS)]
    results.append(vocab.decode(row))
  return results
