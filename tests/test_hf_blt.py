"""Golden tests against transformers' ``BltForCausalLM`` (issue #14), without torch.

The fixtures in ``tests/fixtures/hf_blt/<config>/`` are tiny random transformers BLT checkpoints with the logits,
entropies, patch lengths and greedy continuations transformers computed for three byte strings (ASCII, multi-byte
UTF-8, code); ``tests/fixtures/make_hf_blt.sh`` remakes them in a separate torch venv. The configs cover encoder
cross-attention in all layers or the last, one and two hash functions, ``max_patch_length``, GQA, a global input
projection, and a sharded checkpoint. Here: our logits equal theirs within 1e-4, patches and greedy generation
are equal, export writes the same tensors back, and bad directories fail with one line naming the problem.
"""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bytescale import cli, convert, vocab
from bytescale.configs import ConfigError
from bytescale.models import registry
from bytescale.models.blt import BLT, reference_options
from bytescale.patching import PatchingConfig
from flax import nnx

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_blt")
CONFIGS = ("cross_all_1hash", "two_hash_gqa", "max_patch_sharded")
OURS_FROM_REFERENCE = np.asarray(vocab.from_reference_id_table())  # reference id -> our id
REFERENCE_COLUMNS = OURS_FROM_REFERENCE  # our logits[:, REFERENCE_COLUMNS] are in reference id order


def fixture(name):
  return os.path.join(FIXTURES, name)


_LOADED = {}


def load(name):
  """(name, model, golden arrays) of a fixture config, loaded once."""
  if name not in _LOADED:
    _LOADED[name] = name, convert.load_hf_model(fixture(name)), dict(np.load(os.path.join(fixture(name), "golden.npz")))
  return _LOADED[name]


@pytest.fixture(scope="module", params=CONFIGS)
def loaded(request):
  return load(request.param)


def our_ids(reference_ids):
  return jnp.asarray(OURS_FROM_REFERENCE[np.asarray(reference_ids)][None], jnp.int32)


def test_logits_entropies_and_patches_equal_transformers(loaded):
  name, model, golden = loaded
  forward = nnx.jit(lambda m, ids: m.forward(ids))
  entropies_of = nnx.jit(lambda m, ids: m.entropies(ids))  # eagerly, each of its ops would compile on its own
  for i in range(3):
    ids = our_ids(golden[f"ids_{i}"])
    out, patches = forward(model, ids)
    logits = np.asarray(out.logits_BxTxV[0])[:, REFERENCE_COLUMNS]
    np.testing.assert_allclose(logits, golden[f"logits_{i}"], atol=1e-4, rtol=0, err_msg=f"{name} string {i}")
    entropies = np.asarray(entropies_of(model, ids)[0])
    np.testing.assert_allclose(entropies, golden[f"entropies_{i}"], atol=1e-4, rtol=0)
    lengths = np.asarray(patches.lengths_BxM[0])
    hf_lengths = golden[f"patch_lengths_{i}"]
    # transformers may end with an empty patch (the boundary after the last byte); ours never holds empty ones.
    assert lengths[lengths > 0].tolist() == hf_lengths[hf_lengths > 0].tolist(), f"{name} string {i}"
    assert int(patches.num_patches_B[0]) >= 5


# Decoding compiles twice per config (about 8 s each): the default run decodes the config with max_patch_length
# (forced patch ends while decoding); the other two are slow (their forward is checked above, decoding by
# test_reference_options_decode_equals_forward_over_the_bytes_so_far).
@pytest.mark.parametrize("config", [c if c == "max_patch_sharded" else pytest.param(c, marks=pytest.mark.slow)
                                    for c in CONFIGS])
def test_greedy_generation_equals_transformers(config):
  """Cached greedy decoding (the prompt in one decode call, then one byte per call) reproduces transformers'
  ``generate``. transformers' argmax runs over all 260 ids (special ids included, no stop at EOS), so this loop
  does too; ``bytescale generate`` never emits BOS/PAD/RESERVED (see the CLI test)."""
  name, model, golden = load(config)
  decode = nnx.jit(lambda m, cache, x: m.decode(cache, x))
  max_len = max(len(golden[f"prompt_ids_{i}"]) + len(golden[f"generated_{i}"]) for i in range(3))
  for i in range(3):
    prompt = our_ids(golden[f"prompt_ids_{i}"])
    expected = OURS_FROM_REFERENCE[golden[f"generated_{i}"]]
    cache = model.init_cache(1, max_len)
    # String 0's prompt in one call (a prefill); the others a byte per call (one compiled shape for the rest).
    pieces = [prompt] if i == 0 else [prompt[:, j:j + 1] for j in range(prompt.shape[1])]
    for piece in pieces:
      out, cache = decode(model, cache, piece)
    generated = []
    for _ in range(len(expected)):
      generated.append(int(jnp.argmax(out.logits_BxTxV[0, -1])))
      out, cache = decode(model, cache, jnp.asarray([[generated[-1]]], jnp.int32))
    assert generated == expected.tolist(), f"{name} string {i}"


def test_export_writes_the_same_tensors_and_config(tmp_path):
  for name in CONFIGS:
    config, params = convert.from_hf(fixture(name))
    out = tmp_path / name
    convert.to_hf(config, params, str(out))
    original = {}
    for file in sorted(os.listdir(fixture(name))):
      if file.endswith(".safetensors"):
        original.update(load_file(os.path.join(fixture(name), file)))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
      assert exported[key].dtype == np.float32 and np.array_equal(exported[key], value), key
    with open(os.path.join(fixture(name), "config.json")) as f:
      hf = json.load(f)
    with open(out / "config.json") as f:
      written = json.load(f)
    assert convert.config_from_hf(written) == config == convert.config_from_hf(hf)
    for key in ("patching_threshold", "max_patch_length", "local_attention_window_len", "cross_attn_k",
                "encoder_hash_byte_group_size", "encoder_hash_byte_group_vocab",
                "encoder_hash_byte_group_nb_functions"):
      assert written[key] == hf[key], key
    for part in ("encoder_config", "decoder_config", "global_config", "patcher_config"):
      for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                  "intermediate_size", "rope_parameters"):
        assert written[part][key] == hf[part][key], (part, key)


def test_cli_convert_generate_and_back(tmp_path, capsys):
  run, back = str(tmp_path / "run"), str(tmp_path / "back")
  assert cli.main(["convert", "--from-hf", fixture("max_patch_sharded"), "--out", run]) in (0, None)
  golden = np.load(os.path.join(fixture("max_patch_sharded"), "golden.npz"))
  prompt = bytes((OURS_FROM_REFERENCE[golden["prompt_ids_0"]][1:]).tolist())
  capsys.readouterr()
  # The prompt is ASCII prose; --temperature 0 is greedy: the bytes of transformers' continuation come out.
  assert cli.main(["generate", "--ckpt", run, "--prompt", prompt.decode(), "--max-bytes", "12", "--temperature", "0",
                   "--json"]) in (0, None)
  text = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
  expected = vocab.decode(OURS_FROM_REFERENCE[golden["generated_0"]])
  assert (OURS_FROM_REFERENCE[golden["generated_0"]] < vocab.NUM_BYTES).all()  # bytes only: the CLI's choice too
  assert text == expected.decode("utf-8", errors="replace")
  assert cli.main(["convert", "--to-hf", run, "--out", back]) in (0, None)
  exported = load_file(os.path.join(back, "model.safetensors"))
  original = {}
  for file in os.listdir(fixture("max_patch_sharded")):
    if file.endswith(".safetensors"):
      original.update(load_file(os.path.join(fixture("max_patch_sharded"), file)))
  assert all(np.array_equal(exported[k], v) for k, v in original.items()) and len(exported) == len(original)


def _broken_copy(tmp_path, edit):
  """A copy of the single-file fixture with ``edit(config_dict, tensors)`` applied."""
  src, dst = fixture("two_hash_gqa"), tmp_path / "broken"
  shutil.copytree(src, dst)
  with open(dst / "config.json") as f:
    config = json.load(f)
  tensors = load_file(str(dst / "model.safetensors"))
  edit(config, tensors)
  with open(dst / "config.json", "w") as f:
    json.dump(config, f)
  save_file(tensors, str(dst / "model.safetensors"))
  return str(dst)


BAD_INPUTS = {
    "missing key": (lambda c, t: t.pop("model.local_decoder.norm.weight"), "missing tensor model.local_decoder.norm"),
    "extra key": (lambda c, t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensor extra"),
    "shape": (lambda c, t: t.update({"model.local_encoder.patch_embedding_projection.weight": np.zeros((5, 5),
                                                                                                      np.float32)}),
              "model.local_encoder.patch_embedding_projection.weight has shape (5, 5)"),
    "unknown field": (lambda c, t: c["global_config"].update(new_knob=3), "unknown field 'new_knob'"),
    "not blt": (lambda c, t: c.update(model_type="llama"), "not a Hugging Face BLT"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_key_and_writes_nothing(case, tmp_path, capsys):
  edit, message = BAD_INPUTS[case]
  source = _broken_copy(tmp_path, edit)
  out = tmp_path / "out"
  assert cli.main(["convert", "--from-hf", source, "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and len(err[-1]) < 400
  assert not out.exists() and [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []


def test_not_a_directory_and_no_config(tmp_path):
  with pytest.raises(ConfigError, match="not a directory"):
    convert.from_hf(str(tmp_path / "absent"))
  with pytest.raises(ConfigError, match="no config.json"):
    convert.from_hf(str(tmp_path))


def test_export_refuses_a_model_transformers_cannot_express():
  config = registry.get_preset("blt", "tiny")
  with pytest.raises(ConfigError, match="hash_function"):
    convert.check_exportable(config)


# --- The reference options on their own (no fixture): cached decoding equals the forward pass ---------------

# Each case compiles the forward at 7 lengths (about 20 s): the default run keeps the one with forced splits too.
@pytest.mark.parametrize("max_patch_length", [pytest.param(None, marks=pytest.mark.slow), 3])
def test_reference_options_decode_equals_forward_over_the_bytes_so_far(max_patch_length, rng):
  """With ``decoder_context='completed_patch'`` a byte's decoder reads its own patch when it closes it, and the
  row's last byte reads as transformers' forward does; every decode call's logits equal the forward pass over the
  bytes seen so far (the previous call's last byte is recomputed when a new byte overturns its reading)."""
  base = registry.get_preset("blt", "tiny")
  config = reference_options(dataclasses.replace(
      base, patching=PatchingConfig("space", max_patch_length=max_patch_length),
      decoder=dataclasses.replace(base.decoder, d_model=32, num_kv_heads=2)))
  config = dataclasses.replace(config, encoder_cross_every_layer=True,
                               encoder=dataclasses.replace(config.encoder, num_layers=2))
  model = BLT(config, rngs=nnx.Rngs(0))
  alphabet = np.array([ord(c) for c in "abcde fgh ij"])
  ids = jnp.asarray(rng.choice(alphabet, size=(2, 23)), jnp.int32).at[:, 0].set(vocab.BOS)
  forward = nnx.jit(lambda m, x: m.forward(x)[0].logits_BxTxV)
  decode = nnx.jit(lambda m, cache, x: m.decode(cache, x))
  cache = model.init_cache(2, 32)
  for start, stop in [(0, 1), (1, 10), (10, 11), (11, 12), (12, 21), (21, 22), (22, 23)]:
    out, cache = decode(model, cache, ids[:, start:stop])
    expected = forward(model, ids[:, :stop])[:, start:stop]
    np.testing.assert_allclose(np.asarray(out.logits_BxTxV), np.asarray(expected), atol=5e-5, rtol=0)


SHARDED_LOAD = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from bytescale import convert, parallel
mesh = parallel.make_mesh("fsdp=2")
sharded = convert.load_hf_model({path!r}, mesh=mesh)
table = sharded.hash_table.get_value()
# Each device holds half of the table (the rules table shards it along one axis): placed by shard, not replicated.
assert [s.data.size for s in table.addressable_shards] == [table.size // 2] * 2, table.sharding
plain = convert.load_hf_model({path!r})
ids = jnp.asarray(np.arange(40)[None] % 200 + 30, jnp.int32)
diff = jnp.abs(sharded(ids).logits_BxTxV - plain(ids).logits_BxTxV).max()
assert float(diff) < 1e-5, diff
print("ok")
"""


def load_sharded(directory):
  """SHARDED_LOAD in a subprocess with two simulated CPU devices: a BACKGROUND job (conftest), so it runs on the
  core this process leaves idle while the tests before it run."""
  import subprocess
  import sys

  from tests.conftest import subprocess_env

  code = SHARDED_LOAD.format(path=fixture("two_hash_gqa"))
  return subprocess.run([sys.executable, "-c", code], env=subprocess_env(devices=2), capture_output=True, text=True,
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))


BACKGROUND = {"sharded_load": load_sharded}


@pytest.fixture(scope="module")
def sharded_load(request):
  from conftest import background_result  # the module pytest loaded, which started the job

  return background_result(load_sharded, request)


def test_load_places_arrays_on_their_shardings(sharded_load):
  """Loading onto a 2-device mesh (a subprocess with two simulated CPU devices) shards the arrays by their logical
  names and computes the same logits."""
  result = sharded_load
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_bos_patch_opens_the_first_two_positions_of_every_document(rng):
  """Against a loop over the rule as the reference states it: positions 0 and 1 of each document, then the global
  threshold rule, then ``max_patch_length`` splits."""
  segments = np.array([[1] * 7 + [2] * 9 + [3] * 1 + [0] * 3])
  entropies = rng.uniform(0, 3, size=segments.shape).astype(np.float32)
  config = PatchingConfig("entropy", threshold=1.5, max_patch_length=3, bos_patch=True)
  patches = patching_patch(config, segments, entropies)
  expected, last_start, position = [], -1, 0
  for t, segment in enumerate(segments[0]):
    position = 0 if t == 0 or segment != segments[0, t - 1] else position + 1
    opens = segment != 0 and (position <= 1 or entropies[0, t - 1] > 1.5)
    if opens:
      last_start = t
    elif segment != 0 and (t - last_start) % 3 == 0:
      opens = True
      last_start = t
    expected.append(bool(opens))
  assert np.asarray(patches.starts_BxT[0]).tolist() == expected


def patching_patch(config, segments, entropies):
  from bytescale import patching

  ids = jnp.zeros(segments.shape, jnp.int32)
  return patching.patch(config, ids, jnp.asarray(segments), entropies_BxT=jnp.asarray(entropies))


def test_reference_option_errors_name_the_field():
  base = registry.get_preset("blt", "tiny")
  with pytest.raises(ConfigError, match="decoder_context.*bos_patch"):
    dataclasses.replace(base, decoder_context="completed_patch")
  with pytest.raises(ConfigError, match="hash_functions"):
    dataclasses.replace(base, hash_functions=2)
  with pytest.raises(ConfigError, match="project_decoder_input"):
    dataclasses.replace(base, project_decoder_input=False, decoder=dataclasses.replace(base.decoder, d_model=48,
                                                                                        head_dim=12))
  with pytest.raises(ConfigError, match="project_global_input"):
    dataclasses.replace(base, project_global_input=False,
                        global_stack=dataclasses.replace(base.global_stack, d_model=96, head_dim=24))
  with pytest.raises(ConfigError, match="cross_residual"):
    dataclasses.replace(base, cross_residual="triple")
