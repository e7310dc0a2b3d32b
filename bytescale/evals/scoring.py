"""Runs any model (the protocol of ``bytescale.models.base``) over evaluation tasks, batched and padded so that a
shape compiles once: rows are right-padded to a width rounded up to ``PAD_MULTIPLE`` (padding has segment id 0,
so no real byte sees it) and batches are filled with empty rows.

* :meth:`Scorer.teacher_forced`: per byte of each row, the log2-probability of that byte given ``[BOS]`` and the
  bytes before it, and the top-1 credit (1/k when the byte is one of k bytes tied for the highest logit, else 0:
  a model with no preference earns exactly 1/256). Models with multi-token heads (``all_head_logits``) also get
  each head's credit.
* :meth:`Scorer.choices`: log-likelihood of each option of :class:`~bytescale.evals.tasks.ChoiceTask`s.
* :meth:`Scorer.greedy`: greedy generation with ``bytescale.generate``'s sampler (KV caches).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bytescale import vocab
from bytescale.evals.tasks import ChoiceTask
from bytescale.generate import SamplingConfig, decode_rows, frame_prompts, make_sampler

PAD_MULTIPLE = 64
LN2 = float(np.log(2.0))


def padded_width(length: int, multiple: int = PAD_MULTIPLE) -> int:
  return max(multiple, -(-length // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class RowScores:
  """Scores of the bytes of one row (index t = ``row[t]``, predicted from ``[BOS] + row[:t]``)."""

  log2_prob: np.ndarray  # [len(row)]
  credit: np.ndarray  # [len(row)]: top-1 credit of the next-byte prediction
  head_credit: np.ndarray | None  # [heads, len(row)]: head h predicts row[t] from [BOS] + row[:t - h]; nan if t < h

  def bits(self, start: int, end: int) -> float:
    return float(-self.log2_prob[start:end].sum())


def top_credit(logits_xV, targets_x):
  """1/k if the target byte is among the k bytes tied for the highest byte logit, else 0 (special ids ignored)."""
  byte_logits = logits_xV[..., :vocab.NUM_BYTES].astype(jnp.float32)
  is_top = byte_logits == jnp.max(byte_logits, axis=-1, keepdims=True)
  index = jnp.clip(targets_x, 0, vocab.NUM_BYTES - 1)[..., None]
  hit = jnp.take_along_axis(is_top, index, axis=-1)[..., 0]
  return jnp.where(targets_x < vocab.NUM_BYTES, hit / jnp.sum(is_top, axis=-1), 0.0)


def _teacher_forced_fn(graphdef, heads: bool):
  def run(state, ids_BxT, segment_ids_BxT):
    model = nnx.merge(graphdef, state)
    logits_BxTxV = model(ids_BxT, segment_ids_BxT).logits_BxTxV[:, :-1].astype(jnp.float32)
    targets_BxT = ids_BxT[:, 1:]
    log_probs = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    log2_prob_BxT = jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0] / LN2
    out = {"log2_prob": log2_prob_BxT, "credit": top_credit(logits_BxTxV, targets_BxT)}
    if heads:
      all_NxBxTxV = model.all_head_logits(ids_BxT, segment_ids_BxT)
      credits = []
      for h in range(all_NxBxTxV.shape[0]):  # head h at position p predicts ids[p + h + 1]
        head_targets_BxT = jnp.pad(ids_BxT[:, h + 1:], ((0, 0), (0, h)), constant_values=vocab.PAD)
        credits.append(top_credit(all_NxBxTxV[h, :, :-1], head_targets_BxT))
      out["head_credit"] = jnp.stack(credits)
    return out

  return jax.jit(run)


class Scorer:
  """One model, its compiled functions (one per shape) and the count of bytes it read and wrote."""

  def __init__(self, model, *, batch_size: int = 16, progress: bool = True):
    if batch_size < 1:
      raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    self.graphdef, self.state = nnx.split(model)
    self.batch_size = batch_size
    self.progress = progress
    self.heads = callable(getattr(model, "all_head_logits", None))
    self._forward = _teacher_forced_fn(self.graphdef, self.heads)
    self._samplers = {}
    self.bytes_evaluated = 0

  def _bar(self, total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=not self.progress, file=sys.stderr, dynamic_ncols=True, leave=False)

  def _batches(self, items: Sequence, desc: str):
    with self._bar(len(items), desc) as bar:
      for first in range(0, len(items), self.batch_size):
        chunk = list(items[first:first + self.batch_size])
        yield chunk
        bar.update(len(chunk))

  def teacher_forced(self, rows: Sequence[bytes], *, width: int | None = None, desc: str = "score") -> list[RowScores]:
    """Scores of every byte of every row. ``width``: the padded length of ``[BOS] + row`` (default: the longest
    row's, rounded up to ``PAD_MULTIPLE``); pass one width for calls that should share a compilation."""
    if not rows:
      return []
    width = width or padded_width(max(len(r) for r in rows) + 1)
    if max(len(r) for r in rows) + 1 > width:
      raise ValueError(f"a row of {max(len(r) for r in rows)} bytes does not fit width {width}")
    results = []
    for chunk in self._batches(rows, desc):
      ids = np.full((self.batch_size, width), vocab.PAD, np.int32)
      segments = np.zeros((self.batch_size, width), np.int32)
      for i, row in enumerate(chunk):
        ids[i, 0] = vocab.BOS
        ids[i, 1:len(row) + 1] = np.frombuffer(row, np.uint8)
        segments[i, :len(row) + 1] = 1
      out = jax.device_get(self._forward(self.state, jnp.asarray(ids), jnp.asarray(segments)))
      for i, row in enumerate(chunk):
        n = len(row)
        head_credit = None
        if "head_credit" in out:
          heads = out["head_credit"].shape[0]
          head_credit = np.full((heads, n), np.nan)
          for h in range(heads):  # entry p of head h predicts row[p + h]
            head_credit[h, h:] = out["head_credit"][h, i, :max(n - h, 0)]
        results.append(RowScores(out["log2_prob"][i, :n].astype(np.float64), out["credit"][i, :n].astype(np.float64),
                                 head_credit))
      self.bytes_evaluated += sum(len(r) for r in chunk)
    return results

  def choices(self, tasks: Sequence[ChoiceTask], *, desc: str = "choices") -> list[np.ndarray]:
    """Per task, the log2-likelihood of each option's bytes after its prompt."""
    rows, spans = [], []
    for task in tasks:
      for option in task.options:
        rows.append(task.prompt + option)
        spans.append((len(task.prompt), len(task.prompt) + len(option)))
    scores = self.teacher_forced(rows, desc=desc)
    log2_likelihoods, k = [], 0
    for task in tasks:
      values = [float(scores[k + j].log2_prob[slice(*spans[k + j])].sum()) for j in range(len(task.options))]
      log2_likelihoods.append(np.array(values))
      k += len(task.options)
    return log2_likelihoods

  def greedy(self, prompts: Sequence[bytes], max_new: int, *, width: int | None = None,
             desc: str = "generate") -> list[bytes]:
    """``max_new`` greedily generated bytes after each prompt (cut at EOS). ``width``: padded length of
    ``[BOS] + prompt`` (default: the longest prompt's, rounded up to ``PAD_MULTIPLE``)."""
    if not prompts:
      return []
    width = width or padded_width(max(len(p) for p in prompts) + 1)
    key = (width, max_new)
    if key not in self._samplers:
      self._samplers[key] = make_sampler(self.graphdef, max_new, SamplingConfig(temperature=0.0), width + max_new)
    sampler = self._samplers[key]
    outputs = []
    for chunk in self._batches(prompts, desc):
      ids, lengths = frame_prompts(list(chunk) + [b""] * (self.batch_size - len(chunk)))
      if ids.shape[1] > width:
        raise ValueError(f"a prompt of {ids.shape[1] - 1} bytes does not fit width {width}")
      padded = np.full((self.batch_size, width), vocab.PAD, np.int32)
      padded[:, :ids.shape[1]] = ids
      tokens = sampler(self.state, jnp.asarray(padded), jnp.asarray(lengths), jax.random.key(0))
      outputs += decode_rows(np.asarray(tokens)[:len(chunk)], stop_at_eos=True)
      self.bytes_evaluated += sum(len(p) for p in chunk) + max_new * len(chunk)
    return outputs


def top_choice_credit(log2_likelihoods: np.ndarray, correct: int) -> float:
  """1/k if the right option is among k options tied for the highest likelihood, else 0."""
  best = log2_likelihoods == log2_likelihoods.max()
  return float(best[correct]) / float(best.sum())
