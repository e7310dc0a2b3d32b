"""Self-speculative decoding: drafts equal a full-forward reference, output equals plain greedy decoding."""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale.models.registry import build_model
from bytescale.models import registry
from bytescale import configs, vocab
from bytescale.data.pipeline import ByteCorpus, DataConfig
from bytescale.ops.sampling import allowed_logits
from bytescale.models.mtp import MultiTokenConfig
from bytescale.speculative import accepted_lengths, decoder_programs, greedy_tokens, speculative_generate
from bytescale.train.metrics import read_jsonl
from tests.conftest import tiny_bytelm_config

TEXT = b"".join(b"def f%d(x):\n    return x + %d\n\n" % (i % 10, i % 7) for i in range(600))
PROMPTS = [b"def f3(x):\n", b"\x01\xfe garbage \x00", b"def"]  # in and out of distribution: ragged acceptance


def build(variant, n=4, trunk=None, seed=0):
  config = MultiTokenConfig(trunk=trunk or tiny_bytelm_config(), mtp_heads=n, mtp_variant=variant)
  return build_model(config, seed=seed)


def test_accepted_lengths_brute_force(rng):
  greedy = rng.integers(0, 3, size=(50, 5))
  drafts = np.where(rng.random((50, 4)) < 0.7, greedy[:, :-1], rng.integers(0, 3, size=(50, 4)))
  got = np.asarray(accepted_lengths(jnp.asarray(drafts), jnp.asarray(greedy)))
  for row in range(50):
    k = 1
    while k <= 4 and drafts[row, k - 1] == greedy[row, k - 1]:
      k += 1
    assert got[row] == k


@pytest.mark.parametrize("variant,n", [("parallel", 3), ("sequential", 3), ("parallel", 8)])
def test_drafts_equal_full_forward_reference(variant, n, rng):
  """After a history of ragged verification steps (blocks appended, rejected bytes rolled back), ``draft``
  proposes exactly what the heads give on a full forward over the confirmed bytes: head j's greedy byte at
  the last position, a sequential head reading the bytes drafted before it. (Parallel heads draft from one
  attention over all heads' cached keys: n=8 checks that no head reads another's.)"""
  batch, width = 2, max(40, 10 * n)  # room for the prompt, 7 verified blocks and the drafts
  model = build(variant, n, seed=1)
  graphdef, params = nnx.split(model)
  call = lambda name: jax.jit(lambda p, *a: getattr(nnx.merge(graphdef, p), name)(*a))  # noqa: E731
  decode, rollback, draft = call("decode"), call("rollback"), call("draft")
  all_logits = call("all_head_logits")

  def reference(sequence, next_byte):
    ids = np.full((1, width), vocab.PAD, np.int32)
    extended = list(sequence) + [next_byte]
    drafts = []
    for j in range(1, n):
      ids[0, :len(extended)] = extended
      segments = (np.arange(width) < len(extended)).astype(np.int32)[None]
      logits = all_logits(params, jnp.asarray(ids), jnp.asarray(segments))[j, :, len(sequence) - 1]
      drafts.append(int(jnp.argmax(allowed_logits(logits), axis=-1)[0]))
      extended.append(drafts[-1])
    return drafts

  prompt = np.concatenate([np.full((batch, 1), vocab.BOS), rng.integers(0, 256, size=(batch, n - 1))], axis=1)
  lengths = np.array([3, 2])  # ragged prompts: the shorter row is rolled back after the prefill
  cache = model.init_cache(batch, width, drafting=True)
  _, cache = decode(params, cache, jnp.asarray(prompt, jnp.int32))
  cache = rollback(params, cache, jnp.asarray(n - lengths))
  sequences = [list(prompt[b, :lengths[b]]) for b in range(batch)]
  for _ in range(7):
    next_B = rng.integers(0, 256, size=batch)
    drafts, cache = draft(params, cache, jnp.asarray(next_B, jnp.int32))
    for b in range(batch):
      assert np.asarray(drafts[b]).tolist() == reference(sequences[b], int(next_B[b])), (b, len(sequences[b]))
    # Verify a block: accept a random prefix per row (drafts may be replaced, as a rejection would).
    block = np.concatenate([next_B[:, None], np.where(rng.random((batch, n - 1)) < 0.5, np.asarray(drafts),
                                                      rng.integers(0, 256, size=(batch, n - 1)))], axis=1)
    _, cache = decode(params, cache, jnp.asarray(block, jnp.int32))
    accepted = rng.integers(1, n + 1, size=batch)
    cache = rollback(params, cache, jnp.asarray(n - accepted))
    for b in range(batch):
      sequences[b] += list(block[b, :accepted[b]])
  assert np.asarray(cache.lengths_B).tolist() == [len(s) for s in sequences]


def assert_identical(model, prompts, max_new):
  result = speculative_generate(model, prompts, max_new, stop_at_eos=False)
  tokens, _ = greedy_tokens(model, prompts, max_new)
  np.testing.assert_array_equal(result.tokens, tokens)
  return result


def simulated_forwards(model, prompts, tokens_BxM):
  """Forwards per row that speculative decoding with parallel heads must run to emit ``tokens_BxM`` (the greedy
  bytes), simulated here: the prefill gives the first byte; each step then accepts the block's known byte and the
  drafts after it while they equal the greedy bytes, draft k being head k's greedy byte at the last confirmed
  position of a teacher-forced full forward over ``[BOS] + prompt + greedy bytes``."""
  assert model.config.mtp_variant == "parallel"  # sequential drafts read earlier drafts, not the greedy bytes
  n, max_new = model.config.mtp_heads, tokens_BxM.shape[1]
  rows = [[vocab.BOS, *prompt, *row] for prompt, row in zip(prompts, np.asarray(tokens_BxM).tolist())]
  ids = np.full((len(rows), max(map(len, rows))), vocab.PAD, np.int32)
  segments = np.zeros_like(ids)
  for r, row in enumerate(rows):
    ids[r, :len(row)], segments[r, :len(row)] = row, 1
  graphdef, params = nnx.split(model)
  logits = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).all_head_logits(x, s))(params, ids, segments)
  heads_NxBxT = np.asarray(jnp.argmax(allowed_logits(logits.reshape(-1, logits.shape[-1])), -1)).reshape(
      logits.shape[:-1])
  forwards = []
  for r, prompt in enumerate(prompts):
    emitted, steps = 1, 1
    while emitted < max_new:
      last = len(prompt) + emitted - 1  # the position before the block's known byte (greedy byte emitted - 1)
      accepted = 1
      while (accepted < n and emitted + accepted - 1 < max_new
             and heads_NxBxT[accepted, r, last] == tokens_BxM[r, emitted + accepted - 1]):
        accepted += 1
      emitted, steps = emitted + accepted, steps + 1
    forwards.append(steps)
  return forwards


@contextlib.contextmanager
def counted_compiles():
  """The XLA compilations that happen inside the block, as a list of events."""
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_random_weights_identical_to_greedy():
  # Sequential heads and patch-model trunks: test_models_identical_to_greedy (slow).
  model = build("parallel", seed=3)
  result = assert_identical(model, PROMPTS, 64)  # the trained model's shapes: compiled once
  assert result.tokens.shape == (3, 64) and (result.forwards <= 64).all()
  assert result.forwards.tolist() == simulated_forwards(model, PROMPTS, result.tokens)
  assert result.steps == result.forwards.max() - 1  # the batch steps until its slowest row is done


def test_decoder_programs_are_the_programs_timed():
  """``decoder_programs`` hands out the very programs ``speculative_generate``/``greedy_tokens`` run (profiling reads
  them): running them decodes the same bytes both ways, and the timed calls afterwards compile nothing."""
  model = build("parallel", seed=3)
  programs = decoder_programs(model, PROMPTS, 48)  # a length no other test decodes: compiled here
  compiled, args = programs["speculative"]
  tokens, forwards, steps = compiled(*args)
  compiled, args = programs["greedy"]
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(compiled(*args)))
  with counted_compiles() as compiles:
    result = assert_identical(model, PROMPTS, 48)
  assert compiles == []
  assert result.forwards.tolist() == np.asarray(forwards).tolist() and result.steps == int(steps)


def test_no_compilation_after_the_first_call(trained):
  """The whole decode is one compiled program, whatever each step accepts: decoding other prompts of the same
  shapes (other acceptance at every step) compiles nothing, speculative or greedy."""
  result, _ = trained
  first = assert_identical(result.model, PROMPTS, 64)
  others = [b"def f6(x):\n", b"\x02\xfd rubbish \x00", b"ret"]
  assert [len(p) for p in others] == [len(p) for p in PROMPTS]
  with counted_compiles() as compiles:
    second = assert_identical(result.model, others, 64)
  assert compiles == []
  assert second.forwards.tolist() != first.forwards.tolist()  # the steps accepted other lengths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny ByteLM with 4 heads trained through the training loop (``next_byte_loss`` dispatches to the heads'
  loss) on repetitive code, so that drafts get accepted; saved as a checkpoint."""
  from bytescale.train.loop import train

  out = str(tmp_path_factory.mktemp("mtp_run"))
  config = MultiTokenConfig(trunk=tiny_bytelm_config(), mtp_heads=4)
  train_config = configs.TrainConfig(steps=50, batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=5,
                                     log_every=10, checkpoint_every=0, eval_batches=1)
  data = DataConfig(source="inline", seq_len=64, batch_size=8)
  corpus = ByteCorpus.from_documents([TEXT[i:i + 2000] for i in range(0, len(TEXT), 2000)], data)
  result = train(config, train_config, data, out, progress=False, corpus=corpus)
  return result, out


def test_trained_heads_train_and_decode_identically(trained):
  result, out = trained
  records = read_jsonl(os.path.join(out, "metrics.jsonl"))
  assert {"bpb_head1", "bpb_head4"} <= set(records[-1])
  assert records[-1]["bpb_head2"] < records[0]["bpb_head2"]  # the extra heads learn too
  single = assert_identical(result.model, PROMPTS[:1], 64)
  assert single.bytes_per_forward > 1.5  # drafts are accepted on text the model knows
  ragged = assert_identical(result.model, PROMPTS, 64)
  assert len(set(ragged.forwards.tolist())) > 1  # rows accepted different numbers of bytes per step
  assert ragged.forwards.tolist() == simulated_forwards(result.model, PROMPTS, ragged.tokens)
  assert single.forwards.tolist() == simulated_forwards(result.model, PROMPTS[:1], single.tokens)


def test_cli_generate_speculative(trained, capsys):
  from bytescale.cli import main

  _, out = trained
  # Same shapes as PROMPTS[:1] in the test above, so the compiled decoders are reused.
  assert main(["generate", "--ckpt", out, "--prompt", "def f1(x):\n", "--max-bytes", "64", "--speculative",
               "--compare-greedy", "--json"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["model"] == "mtp" and report["identical_to_greedy"] is True
  assert report["bytes_per_forward"] > 1.5 and report["bytes_per_s"] > 0 and report["speedup"] > 0
  assert main(["generate", "--ckpt", out, "--speculative", "--temperature", "0.7"]) == 2
  assert "greedily" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["bytelm", "megabyte", "blt"])
@pytest.mark.parametrize("variant", ["parallel", "sequential"])
def test_models_identical_to_greedy(model_name, variant):
  """Random weights, every trunk (heads on MegaByte's local model and BLT's local decoder), both variants."""
  trunk = tiny_bytelm_config() if model_name == "bytelm" else registry.get_preset(model_name, "tiny")
  if model_name == "blt":
    trunk = configs.replace_path(trunk, "patcher", "space")
  assert_identical(build(variant, 3, trunk=trunk, seed=4), PROMPTS, 24)
