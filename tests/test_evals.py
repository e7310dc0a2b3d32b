"""Evaluation suites (bytescale.evals): every generator checked by an oracle written here, the scorer checked
against plain per-row forwards, and two fake models end to end: one that reads the answer scores 100%, one with
uniform logits scores chance."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale import vocab
from bytescale.evals import chars, induction, noise, passkey, suites
from bytescale.evals.scoring import Scorer
from bytescale.models.base import ModelOutput
from bytescale.ops.rows import take_rows, write_rows

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. Café déjà vu, naïve façade: 東京 and "
        "Zürich — a smörgåsbord of words. Make take bake lake wake; hold bold cold fold gold told; light night "
        "might right sight tight; stone store stare share shore; winter winder wander wonder; house horse worse "
        "purse nurse; clouds cloves gloves groves; summer simmer hammer hummer dimmer. ") * 4


# --- Generators, each against an oracle ------------------------------------------------------------------------

def apply_edits(clean: str, edits) -> str:
  """The noised string the declared edits describe, rebuilt character by character."""
  by_index = {e.index: e.kind for e in edits}
  out, i = [], 0
  while i < len(clean):
    kind = by_index.get(i)
    if kind == "case":
      out.append(clean[i].upper() if clean[i].islower() else clean[i].lower())
    elif kind == "drop":
      pass
    elif kind == "repeat":
      out.append(clean[i] * 2)
    elif kind == "swap":
      out.append(clean[i + 1] + clean[i])
      i += 1
    else:
      out.append(clean[i])
    i += 1
  return "".join(out)


def test_noise_differs_from_clean_exactly_in_the_declared_places():
  examples = noise.generate(TEXT, seed=3, examples=6, context_chars=120, continuation_chars=40)
  seen_kinds, edits_per_level = set(), {}
  for e in examples:
    assert e.context == apply_edits(e.clean_context, e.edits)
    assert e.clean_context + e.continuation in TEXT and len(e.continuation) == 40  # clean, untouched
    context_bytes = e.context.encode()
    assert context_bytes.decode("utf-8") == e.context  # whole characters only
    indices = [x.index for x in e.edits]
    assert indices == sorted(set(indices))
    for x in e.edits:
      char = e.clean_context[x.index]
      if x.kind == "case":
        assert char.swapcase() != char
      if x.kind == "swap":  # a real swap, and the partner is not edited again
        assert e.clean_context[x.index + 1] != char and x.index + 1 not in indices
      if e.kind != "mixed":
        assert x.kind == e.kind
      seen_kinds.add(x.kind)
    if e.kind == "clean":
      assert e.edits == () and e.context == e.clean_context
    else:
      edits_per_level.setdefault(e.level, []).append(len(e.edits))
  assert seen_kinds == set(noise.KINDS)
  means = [np.mean(edits_per_level[level]) for level in sorted(edits_per_level)]
  assert means == sorted(means) and means[0] > 0
  # Multi-byte characters get edited too (whole): some noised example changed a non-ASCII character.
  assert any(ord(e.clean_context[x.index]) > 127 for e in examples for x in e.edits)


def test_generators_are_deterministic_per_seed():
  a = noise.generate(TEXT, seed=1, examples=3, context_chars=60, continuation_chars=20)
  b = noise.generate(TEXT, seed=1, examples=3, context_chars=60, continuation_chars=20)
  c = noise.generate(TEXT, seed=2, examples=3, context_chars=60, continuation_chars=20)
  assert a == b and a != c
  assert chars.generate(TEXT, seed=5, examples=2) == chars.generate(TEXT, seed=5, examples=2)
  assert passkey.generate([300], seed=5) == passkey.generate([300], seed=5) != passkey.generate([300], seed=6)


@functools.lru_cache(maxsize=None)
def levenshtein(a: str, b: str) -> int:
  if not a or not b:
    return len(a) + len(b)
  return min(levenshtein(a[1:], b) + 1, levenshtein(a, b[1:]) + 1, levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


LINE = {
    "spell": re.compile(r'^spell "(\w+)": (.*)$'),
    "reverse": re.compile(r'^reverse "(\w+)": (.*)$'),
    "insert": re.compile(r'^add "(\w)" after every "(\w)" in "(\w+)": (.*)$'),
    "delete": re.compile(r'^delete every "(\w)" from "(\w+)": (.*)$'),
    "substitute": re.compile(r'^replace every "(\w)" with "(\w)" in "(\w+)": (.*)$'),
    "orth": re.compile(r'^closest in spelling to "(\w+)": "(\w+)", "(\w+)", "(\w+)" or "(\w+)"\? (.*)$'),
}


def oracle_answer(kind: str, groups) -> str:
  """The right answer of a task line, from plain string operations on what the line says."""
  if kind == "spell":
    return " ".join(groups[0])
  if kind == "reverse":
    return groups[0][::-1]
  if kind == "insert":
    new, old, word = groups[:3]
    return word.replace(old, old + new)
  if kind == "delete":
    return groups[1].replace(groups[0], "")
  if kind == "substitute":
    old, new, word = groups[:3]
    return word.replace(old, new)
  word, candidates = groups[0], groups[1:5]
  distances = [levenshtein(word, c) for c in candidates]
  best = [c for c, d in zip(candidates, distances) if d == min(distances)]
  assert len(best) == 1, f"{word}: no unique closest candidate among {candidates}"
  return best[0]


def test_every_chars_answer_is_verified_by_string_operations():
  tasks = chars.generate(TEXT, seed=0, examples=3, shots=2)
  words = set(re.findall(r"[^\W\d_]+", TEXT.lower()))
  assert [t.kind for t in tasks] == [k for k in chars.KINDS for _ in range(3)]
  for task in tasks:
    lines = (task.prompt + task.answer).split("\n")
    assert len(lines) == 3  # two solved shots, then the query with its answer
    for line in lines:  # every shot and the query: the answer on the line is the right one
      match = LINE[task.kind].match(line)
      assert match, line
      *groups, answer = match.groups()
      assert answer == oracle_answer(task.kind, groups), line
    assert task.word in words and task.word not in [s.word for s in task.shots]
    assert task.options[task.correct] == task.answer
    assert len(set(task.options)) == chars.NUM_OPTIONS
    assert len({len(o.encode()) for o in task.options}) == 1  # equal lengths: length never decides
    choice = task.choice()
    assert choice.options[choice.correct] == (task.answer + "\n").encode()


def test_passkey_is_present_exactly_once_at_the_declared_depth():
  tasks = passkey.generate([200, 400, 1000], seed=0, examples=3, depths=(0.0, 0.3, 0.6, 1.0))
  assert len(tasks) == 3 * 4 * 3
  for t in tasks:
    prompt = t.prompt
    assert prompt.count(t.key) == 1 and prompt.index(t.key) == t.key_offset
    assert re.fullmatch(r"[1-9]\d{4}", t.key)
    assert t.length - 24 < len(prompt.encode()) <= t.length  # whole filler sentences (each at most 24 bytes)
    assert prompt.endswith("What is the pass key? The pass key is ")
    key_sentence = f"The pass key is {t.key}. Remember it. "
    before = prompt.index(key_sentence)
    filler = prompt[:before] + prompt[before + len(key_sentence):-len("What is the pass key? The pass key is ")]
    assert not re.search(r"\d", filler)
    assert math.isclose(t.depth, before / len(filler))
    assert abs(t.depth - t.nominal_depth) <= 24 / len(filler)  # the nearest sentence boundary
    assert before == 0 or prompt[before - 2:before] == ". "
  with pytest.raises(ValueError, match="--passkey-lengths"):
    passkey.generate([100])


def test_induction_second_copy_equals_the_first():
  tasks = induction.generate(seed=0, examples=5, lengths=(8, 40))
  assert len(tasks) == 2 * 2 * 5
  for t in tasks:
    first, second = t.sequence[:t.length], t.sequence[t.length:]
    assert first == second and len(t.sequence) == 2 * t.length
    if t.alphabet == "letters":
      assert set(first) <= set(string.ascii_lowercase.encode())
    span = t.second_copy()
    assert (span.start, span.end) == (t.length + 1, 2 * t.length)
  assert len({t.sequence for t in tasks}) == len(tasks)


# --- Fake models speaking the protocol ---------------------------------------------------------------------

class Table(nnx.Variable):
  pass


TRACES = {"call": 0, "decode": 0}


class ReadingLM(nnx.Module):
  """Reads the answer. Generating (``decode``), it puts all logit mass on the next byte of the first of its
  documents that the bytes so far begin. Scoring a whole row (``__call__``, ``peek``), it puts all mass on the
  row's own next byte while the row still agrees with one of its documents through that byte (or agrees with none
  any more), and on a document's byte where the row leaves the last documents it agreed with: the right option of a
  choice gets probability 1, every other option probability ~0 at the byte where it goes wrong. With no
  documents and no peeking it is the uniform model."""

  def __init__(self, documents=(), *, peek: bool = False, width: int = 1024):
    rows = np.full((max(len(documents), 1), width + 1), -1, np.int32)
    for i, doc in enumerate(documents):
      ids = [vocab.BOS] + list(doc)
      rows[i, :len(ids)] = ids
    self.documents = Table(jnp.asarray(rows))
    self.peek = peek

  def _matches(self, ids_BxT):
    """Which documents begin with ``ids[:t + 1]`` (BxNxT), and each document's byte after position t (1xNxT)."""
    docs_NxW = self.documents[...]
    t = ids_BxT.shape[1]
    prefix_BxNxT = jnp.cumprod(docs_NxW[None, :, :t] == ids_BxT[:, None, :], axis=-1).astype(bool)
    next_1xNxT = docs_NxW[None, :, 1:t + 1]
    return prefix_BxNxT & (next_1xNxT >= 0), next_1xNxT

  @staticmethod
  def _first(ok_BxNxT, next_1xNxT):
    first_BxT = jnp.argmax(ok_BxNxT, axis=1)
    chosen = jnp.take_along_axis(jnp.broadcast_to(next_1xNxT, ok_BxNxT.shape), first_BxT[:, None], axis=1)[:, 0]
    return jnp.where(ok_BxNxT.any(axis=1), chosen, -1)

  @staticmethod
  def _logits(next_BxT):
    hot = jax.nn.one_hot(jnp.maximum(next_BxT, 0), vocab.VOCAB_SIZE, dtype=bool)
    return jnp.where((next_BxT >= 0)[..., None], jnp.where(hot, 0.0, -1e9), 0.0)

  def __call__(self, bytes_BxT, segment_ids_BxT=None, *, patches=None):
    TRACES["call"] += 1
    ok_BxNxT, next_1xNxT = self._matches(bytes_BxT)
    next_BxT = self._first(ok_BxNxT, next_1xNxT)
    if self.peek:
      actual_BxT = jnp.pad(bytes_BxT[:, 1:], ((0, 0), (0, 1)), constant_values=vocab.PAD)
      agrees_BxT = (ok_BxNxT & (next_1xNxT == actual_BxT[:, None])).any(axis=1)
      next_BxT = jnp.where(agrees_BxT | (next_BxT < 0), actual_BxT, next_BxT)
    return ModelOutput(self._logits(next_BxT), jnp.zeros(bytes_BxT.shape + (1,)))

  def unembed(self, hidden_BxTxD):
    return jnp.zeros(hidden_BxTxD.shape[:-1] + (vocab.VOCAB_SIZE,))

  def init_cache(self, batch: int, max_len: int):
    return {"ids": jnp.full((batch, max_len), vocab.PAD, jnp.int32), "lengths": jnp.zeros((batch,), jnp.int32)}

  def decode(self, cache, bytes_BxN):
    TRACES["decode"] += 1
    n = bytes_BxN.shape[1]
    ids = write_rows(cache["ids"], bytes_BxN.astype(jnp.int32), cache["lengths"])
    positions_BxN = cache["lengths"][:, None] + jnp.arange(n, dtype=jnp.int32)
    next_BxN = take_rows(self._first(*self._matches(ids)), positions_BxN)
    return (ModelOutput(self._logits(next_BxN), jnp.zeros(bytes_BxN.shape + (1,))),
            {"ids": ids, "lengths": cache["lengths"] + n})

  @staticmethod
  def rollback(cache, n_B):
    return {"ids": cache["ids"], "lengths": cache["lengths"] - n_B}


SETTINGS = suites.SuiteSettings(seed=0, examples=3, context_chars=60, continuation_chars=24, shots=1,
                                passkey_lengths=(170, 230), passkey_depths=(0.2, 0.8), induction_lengths=(6, 20))


def documents_for(name: str, settings) -> list[bytes]:
  """What the reading model reads: each generation task's prompt with its answer (noise and induction rows are
  scored whole, so peeking at the row is reading the answer)."""
  if name == "chars":
    tasks = chars.generate(TEXT, seed=settings.seed, examples=settings.examples, shots=settings.shots)
    return [(t.prompt + t.answer + "\n").encode() for t in tasks]
  if name == "passkey":
    tasks = passkey.generate(settings.passkey_lengths, seed=settings.seed, examples=settings.examples,
                             depths=settings.passkey_depths)
    return [(t.prompt + t.key).encode() for t in tasks]
  return []


def test_a_model_that_reads_the_answer_scores_100_percent():
  s = {}
  for name in suites.SUITE_NAMES:
    model = ReadingLM(documents_for(name, SETTINGS), peek=True)
    result = suites.run_suites(model, [name], TEXT.encode(), SETTINGS, batch_size=4, progress=False)
    s[name] = result["suites"][name]["scores"]
    assert result["bytes_evaluated"] == result["suites"][name]["bytes_evaluated"] > 0
  assert s["noise"]["clean_bpb"] < 1e-6
  assert all(abs(v) < 1e-6 for v in s["noise"].values())
  assert all(s["chars"][f"{kind}/{how}"] == 1.0 for kind in chars.KINDS for how in ("exact", "choice"))
  assert all(v == 1.0 for v in s["passkey"].values())
  assert all(v == 1.0 for name, v in s["induction"].items() if name != "chance")


def test_noise_increase_is_the_bits_lost_on_the_clean_continuation():
  """A model that knows only the clean rows: 0 bits on a clean continuation, log2(260) per byte once a noised
  context has left every clean row; so each condition's increase is log2(260) x its share of continuation bytes
  after a context with at least one edit."""
  examples = noise.generate(TEXT, seed=SETTINGS.seed, examples=SETTINGS.examples,
                            context_chars=SETTINGS.context_chars, continuation_chars=SETTINGS.continuation_chars,
                            levels=SETTINGS.noise_levels)
  model = ReadingLM([(e.context + e.continuation).encode() for e in examples if e.kind == "clean"])
  scores = suites.run_suites(model, ["noise"], TEXT.encode(), SETTINGS, batch_size=4,
                             progress=False)["suites"]["noise"]["scores"]
  noised_bytes, all_bytes = {}, {}
  for e in examples:
    size = len(e.continuation.encode())
    all_bytes[e.name] = all_bytes.get(e.name, 0) + size
    noised_bytes[e.name] = noised_bytes.get(e.name, 0) + size * bool(e.edits)
  assert scores["clean_bpb"] == pytest.approx(0.0, abs=1e-6)
  for name in all_bytes:
    if name != "clean":
      expected = math.log2(vocab.VOCAB_SIZE) * noised_bytes[name] / all_bytes[name]
      assert scores[name] == pytest.approx(expected, abs=1e-4), name


def test_a_uniform_model_scores_chance():
  result = suites.run_suites(ReadingLM(), suites.SUITE_NAMES, TEXT.encode(), SETTINGS, batch_size=4,
                             progress=False)
  s = {name: suite["scores"] for name, suite in result["suites"].items()}
  # Chance, computed here: every byte 1/260 (the whole vocabulary), so no context changes a continuation's bits;
  # 1/4 per choice (four options of equal length tie); 1/256 for the next byte among 256 tied bytes; greedy
  # generation picks byte 0, which no answer is made of.
  uniform_bits = math.log2(vocab.VOCAB_SIZE)
  assert s["noise"]["clean_bpb"] == pytest.approx(uniform_bits, abs=1e-4)
  assert all(v == pytest.approx(0.0, abs=1e-4) for name, v in s["noise"].items() if name != "clean_bpb")
  char_tasks = chars.generate(TEXT, seed=0, examples=SETTINGS.examples, shots=SETTINGS.shots)
  chance = np.mean([1 / len(t.options) for t in char_tasks])
  assert s["chars"]["choice"] == pytest.approx(chance, abs=1e-5) and chance == 0.25
  assert all(s["chars"][f"{kind}/choice"] == pytest.approx(0.25, abs=1e-5) for kind in chars.KINDS)
  assert all("\0" not in t.answer for t in char_tasks) and s["chars"]["exact"] == 0.0
  assert all(v == 0.0 for v in s["passkey"].values())
  assert all(v == pytest.approx(1 / 256, abs=1e-5) for v in s["induction"].values())


def test_each_shape_compiles_once():
  model = ReadingLM([b"abcdef\n", b"xyz\n"], peek=True)
  scorer = Scorer(model, batch_size=2, progress=False)
  TRACES.update(call=0, decode=0)
  rows = [b"a" * n for n in (3, 10, 20, 5, 40, 7)]  # three batches of different lengths, one width (64)
  scorer.teacher_forced(rows)
  scorer.teacher_forced(rows[:3])
  assert TRACES["call"] == 1
  prompts = [b"abc", b"x", b"abcde", b"xy", b"ab"]
  # Past a document's end the model is uniform: greedy picks byte 0.
  assert scorer.greedy(prompts, 4) == [b"def\n", b"yz\n\0", b"f\n\0\0", b"z\n\0\0", b"cdef"]
  assert TRACES["decode"] >= 1
  traced = TRACES["decode"]
  scorer.greedy(prompts[::-1], 4)
  assert TRACES["decode"] == traced


# --- The scorer against plain per-row forwards, on real models ---------------------------------------------

def tiny_model(name: str):
  from bytescale.models import registry
  from bytescale.models.mtp import MultiTokenConfig
  from bytescale.patching import PatchingConfig

  from conftest import tiny_bytelm_config

  if name == "bytelm":
    return registry.build_model(tiny_bytelm_config(num_layers=1), seed=0)
  if name == "megabyte":
    return registry.build_model(registry.get_preset("megabyte", "tiny"), seed=1)
  if name == "blt-space":
    blt = dataclasses.replace(registry.get_preset("blt", "tiny"), patching=PatchingConfig("space"))
    return registry.build_model(blt, seed=2)
  return registry.build_model(MultiTokenConfig(trunk=tiny_bytelm_config(num_layers=1), mtp_heads=2), seed=3)


@pytest.mark.parametrize("name", ["bytelm", "mtp", pytest.param("megabyte", marks=pytest.mark.slow),
                                  pytest.param("blt-space", marks=pytest.mark.slow)])
def test_padded_batches_score_like_single_rows(name):
  model = tiny_model(name)
  # Three rows, two batches of two: the second batch is filled with an empty row; every row is padded to 64.
  rows = [b"To be, or not", b"to be: that i", b"s the question: whether 'tis nobler in the"]
  scores = Scorer(model, batch_size=2, progress=False).teacher_forced(rows)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits_BxTxV)
  for row, score in zip(rows, scores):
    ids = jnp.asarray([[vocab.BOS] + list(row)], jnp.int32)  # alone and unpadded
    logits = np.asarray(forward(state, ids)[0, :-1], np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    expected = log_probs[np.arange(len(row)), list(row)] / np.log(2)
    np.testing.assert_allclose(score.log2_prob, expected, atol=2e-4)
    np.testing.assert_array_equal(score.credit > 0, logits[:, :256].argmax(-1) == np.array(list(row)))
    if name == "mtp":
      assert score.head_credit.shape == (2, len(row)) and np.isnan(score.head_credit[1, 0])


# --- The command line --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["eval", "--ckpt", "/no/such/run"], "--data"),
    (["eval", "--ckpt", "/no/such/run", "--suite", "noise,spelling"], "--suite"),
])
def test_eval_flags_fail_with_one_line(argv, message, capsys):
  from bytescale import cli

  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_eval_suites_from_a_checkpoint(tmp_path, capsys):
  from bytescale import cli, configs
  from bytescale.data.pipeline import DataConfig
  from bytescale.train.loop import train

  from conftest import tiny_bytelm_config

  corpus = tmp_path / "text.txt"
  corpus.write_text(TEXT)
  train(tiny_bytelm_config(num_layers=1), configs.TrainConfig(steps=2, batch_size=2, seq_len=64),
        DataConfig(source=str(corpus), seq_len=64, batch_size=2), str(tmp_path / "run"), progress=False)
  capsys.readouterr()
  assert cli.main(["eval", "--ckpt", str(tmp_path / "run"), "--suite", "all", "--examples", "1", "--json",
                   "--passkey-lengths", "170", "--no-progress"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result["seed"] == 0 and result["model"] == "bytelm" and result["data"].startswith("validation split")
  assert set(result["suites"]) == set(suites.SUITE_NAMES)
  assert set(result["suites"]["passkey"]["scores"]) == {"N=170/depth=0.1", "N=170/depth=0.5", "N=170/depth=0.9",
                                                       "N=170", "mean"}
  assert result["bytes_evaluated"] == sum(s["bytes_evaluated"] for s in result["suites"].values())
