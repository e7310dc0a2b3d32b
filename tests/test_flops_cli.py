"""`bytescale flops`: overrides, multi-token heads, BLT's fractional patch size, and clear errors."""

import json

import pytest

from bytescale import cli, vocab
from bytescale.models.registry import get_preset


def run_json(capsys, *argv):
  assert cli.main(["flops", *argv, "--json"]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_multi_token_heads_add_their_blocks_and_unembeddings(capsys):
  """Each extra parallel head is one transformer block of the trunk's shape plus an unembedding: counted here
  by hand from the preset's dimensions, independently of the registered counter."""
  seq_len = 256
  two = run_json(capsys, "--model", "bytelm", "--preset", "tiny", "--seq-len", str(seq_len), "--set", "mtp_heads=2")
  four = run_json(capsys, "--model", "bytelm", "--preset", "tiny", "--seq-len", str(seq_len), "--set", "mtp_heads=4")
  s = get_preset("bytelm", "tiny").stack
  d, h, g, k, f = s.d_model, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_hidden
  block = 2 * d * k * (2 * h + 2 * g) + 2 * 2 * h * k * (seq_len + 1) / 2 + 2 * 3 * d * f
  assert four["forward_per_byte"] - two["forward_per_byte"] == pytest.approx(2 * (block + 2 * d * vocab.VOCAB_SIZE))
  # The whole count by hand: the trunk's blocks, then four heads of a block and an unembedding each. Training runs
  # every matmul three times (forward, gradient of its input, gradient of its weight); nothing is frozen here.
  forward = (s.num_layers + 4) * block + 4 * 2 * d * vocab.VOCAB_SIZE
  assert four["forward_per_byte"] == pytest.approx(forward)
  assert four["training_per_byte"] == pytest.approx(forward + 2 * forward)
  assert any(name.startswith("mtp_heads.") for name in four["components"])


def test_blt_patch_size_is_an_average_and_only_moves_the_global_part(capsys):
  at4 = run_json(capsys, "--model", "blt", "--preset", "400m", "--seq-len", "8192", "--patch-size", "4")
  at6 = run_json(capsys, "--model", "blt", "--preset", "400m", "--seq-len", "8192", "--patch-size", "6.0")
  glob = lambda out: sum(v for n, v in out["components"].items() if n.startswith("global."))  # noqa: E731
  # Global MLP/projection FLOPs per byte scale as 1/p; its attention over seq_len/p patches as 1/p^2.
  assert 4 / 6 * glob(at4) > glob(at6) > (4 / 6) ** 2 * glob(at4)
  assert at4["components"]["decoder.mlp"] == at6["components"]["decoder.mlp"]


def test_megabyte_patch_size_and_field_overrides(capsys):
  p4 = run_json(capsys, "--model", "megabyte", "--preset", "tiny", "--patch-size", "4", "--seq-len", "1023")
  p8 = run_json(capsys, "--model", "megabyte", "--preset", "tiny", "--patch-size", "8", "--seq-len", "1023")
  assert p8["components"]["global_mlp"] == pytest.approx(p4["components"]["global_mlp"] / 2)
  wider = run_json(capsys, "--model", "bytelm", "--preset", "tiny", "--set", "mlp_hidden=256")
  base = run_json(capsys, "--model", "bytelm", "--preset", "tiny")
  s = get_preset("bytelm", "tiny").stack
  assert wider["components"]["mlp"] - base["components"]["mlp"] == pytest.approx(
      s.num_layers * 2 * 3 * s.d_model * (256 - s.mlp_hidden))


@pytest.mark.parametrize("argv, message", [
    (["--model", "megabyte", "--patch-size", "2.5"], "whole number"),
    (["--model", "bytelm", "--set", "no_such_field=1"], "no_such_field"),
    (["--model", "bytelm", "--set", "mtp_heads"], "FIELD=VALUE"),
    (["--model", "bytelm", "--set", "mtp_bogus=1"], "mtp_bogus"),
])
def test_bad_input_names_the_problem(capsys, argv, message):
  assert cli.main(["flops", *argv]) == 2
  assert message in capsys.readouterr().err


def test_entropy_model_is_reported_separately_and_frozen(capsys):
  """The paper-size entropy model scores each 8192-byte row in one window: its cost per byte is that of the
  ByteLM preset itself, added once to the forward and once (no backward) to the training count."""
  argv = ["--model", "blt", "--preset", "1b", "--seq-len", "8192"]
  without = run_json(capsys, *argv)
  with_entropy = run_json(capsys, *argv, "--entropy-model-preset", "entropy-100m")
  entropy_lm = run_json(capsys, "--model", "bytelm", "--preset", "entropy-100m", "--seq-len", "8192")
  extra = with_entropy["forward_per_byte"] - without["forward_per_byte"]
  assert extra == pytest.approx(entropy_lm["forward_per_byte"])
  assert with_entropy["training_per_byte"] - without["training_per_byte"] == pytest.approx(extra)
  assert all(name.startswith("entropy_model.") for name in set(with_entropy["components"]) - set(
      without["components"]))
  assert cli.main(["flops", "--model", "megabyte", "--entropy-model-preset", "entropy-100m"]) == 2
