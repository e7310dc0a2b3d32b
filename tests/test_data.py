"""Tests for bytescale.data: framing, packing, splitting, the grain pipeline, sources and the tfds builder.

Expected values come from plain Python loops written independently of the vectorised code under test.
"""

import os
import pathlib
import sysconfig

import numpy as np
import pytest

from bytescale.data import (
    ByteCorpus,
    DataConfig,
    DataError,
    eval_batches,
    frame_documents,
    load_documents,
    num_rows,
    pack_rows,
    split_stream,
    train_iterator,
)
from bytescale.vocab import BOS, EOS, PAD


def random_documents(seed, count=12, max_length=40):
  """Documents of mixed lengths (empty ones included) over a byte alphabet rich in NUL and BOS-like values."""
  rng = np.random.default_rng(seed)
  documents = []
  for _ in range(count):
    length = int(rng.choice([0, 1, 2, int(rng.integers(3, max_length))]))
    # Byte 0 appears often on purpose: it must be treated as an ordinary byte.
    documents.append(bytes(int(value) for value in rng.choice([0, 0, 1, 255, 65, 10], size=length)))
  return documents


def brute_force_stream(documents):
  """(stream, document index of every stream position)."""
  stream, owner = [], []
  for index, document in enumerate(documents):
    framed = [BOS] + list(document) + [EOS]
    stream += framed
    owner += [index] * len(framed)
  return stream, owner


def brute_force_rows(stream, owner, seq_len):
  """Every packed row, computed position by position from the definition."""
  rows = []
  row_count = 0
  while row_count * seq_len + 1 < len(stream):
    row_count += 1
  for row_index in range(row_count):
    inputs, targets, segment_ids, loss_mask = [], [], [], []
    numbering = {}
    for offset in range(seq_len):
      input_position = row_index * seq_len + offset
      target_position = input_position + 1
      inputs.append(stream[input_position] if input_position < len(stream) else PAD)
      targets.append(stream[target_position] if target_position < len(stream) else PAD)
      if input_position < len(stream):
        document = owner[input_position]
        numbering.setdefault(document, len(numbering) + 1)
        segment_ids.append(numbering[document])
      else:
        segment_ids.append(0)
      same_document = target_position < len(stream) and owner[target_position] == owner[input_position]
      loss_mask.append(1.0 if same_document else 0.0)
    rows.append({"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "loss_mask": loss_mask})
  return rows


def assert_row_equal(row, expected):
  assert row["inputs"].dtype == np.int32 and row["targets"].dtype == np.int32
  assert row["segment_ids"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
  for key in expected:
    np.testing.assert_array_equal(row[key], np.asarray(expected[key]), err_msg=key)


# Framing and packing.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frame_documents_matches_loop(seed):
  documents = random_documents(seed) + [b"", b"\x00", b"\x00" * 5]
  stream = frame_documents(documents)
  expected, _ = brute_force_stream(documents)
  assert stream.tolist() == expected
  assert frame_documents([]).shape == (0,)


@pytest.mark.parametrize("seq_len", [1, 3, 8, 17])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_rows_matches_brute_force(seq_len, seed):
  # Documents longer than a row (up to 60 bytes vs seq_len <= 17), empty ones, and NUL bytes.
  documents = random_documents(seed, count=10, max_length=60)
  stream, owner = brute_force_stream(documents)
  tokens = frame_documents(documents)
  expected_rows = brute_force_rows(stream, owner, seq_len)
  assert num_rows(len(tokens), seq_len) == len(expected_rows)
  for row_index, expected in enumerate(expected_rows):
    assert_row_equal(pack_rows(tokens, seq_len, row_index), expected)
  with pytest.raises(IndexError):
    pack_rows(tokens, seq_len, len(expected_rows))


def test_nul_bytes_are_trained_and_eos_targets_count():
  tokens = frame_documents([b"\x00\x00", b"\x00"])  # BOS 0 0 EOS BOS 0 EOS
  row = pack_rows(tokens, 6, 0)
  assert row["targets"].tolist() == [0, 0, EOS, BOS, 0, EOS]
  assert row["loss_mask"].tolist() == [1, 1, 1, 0, 1, 1]
  assert row["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2]


def test_rows_never_share_a_segment_between_documents():
  documents = random_documents(5, count=30, max_length=12)
  stream, owner = brute_force_stream(documents)
  tokens = frame_documents(documents)
  seq_len = 16
  for row_index in range(num_rows(len(tokens), seq_len)):
    row = pack_rows(tokens, seq_len, row_index)
    documents_of_segment = {}
    for offset, segment in enumerate(row["segment_ids"].tolist()):
      position = row_index * seq_len + offset
      if segment == 0:
        assert position >= len(stream)
        continue
      documents_of_segment.setdefault(segment, set()).add(owner[position])
    assert all(len(owners) == 1 for owners in documents_of_segment.values())
    all_owners = [next(iter(owners)) for owners in documents_of_segment.values()]
    assert len(all_owners) == len(set(all_owners))  # distinct segments are distinct documents
    assert sorted(documents_of_segment) == list(range(1, len(documents_of_segment) + 1))


@pytest.mark.parametrize("seq_len,batch_size", [(5, 3), (8, 2), (64, 4)])
def test_eval_batches_target_every_token_exactly_once(seq_len, batch_size):
  documents = random_documents(3, count=15)
  tokens = frame_documents(documents)
  batches = list(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size))
  assert all(batch[key].shape == (batch_size, seq_len) for batch in batches for key in batch)
  targets = np.concatenate([batch["targets"].reshape(-1) for batch in batches])
  mask = np.concatenate([batch["loss_mask"].reshape(-1) for batch in batches])
  target_count = len(tokens) - 1
  # Row-major order of all target slots is exactly the stream after its first token, then padding.
  assert targets[:target_count].tolist() == tokens[1:].tolist()
  assert (targets[target_count:] == PAD).all() and (mask[target_count:] == 0).all()
  assert len(targets) - target_count < seq_len * batch_size  # at most one batch worth of padding
  expected_mask = [0.0 if token == BOS else 1.0 for token in tokens[1:].tolist()]
  assert mask[:target_count].tolist() == expected_mask
  assert list(eval_batches(tokens[:1], seq_len=seq_len, batch_size=batch_size)) == []


def test_eval_batches_on_unframed_bytes():
  tokens = np.frombuffer(b"abc\x00defgh", dtype=np.uint8)
  (batch,) = eval_batches(tokens, seq_len=4, batch_size=4)
  assert batch["targets"][:2].reshape(-1).tolist() == list(b"bc\x00defgh")
  assert batch["loss_mask"].sum() == 8 and (batch["segment_ids"][:2] == 1).all()
  assert (batch["segment_ids"][2:] == 0).all() and (batch["targets"][2:] == PAD).all()  # padding rows


# Split.


@pytest.mark.parametrize("length", [1, 9, 10, 11, 99, 100, 1001, 12345])
def test_split_is_exactly_the_last_tenth(length):
  stream = np.arange(length, dtype=np.uint16)
  train, validation = split_stream(stream, 0.1)
  assert len(validation) == length // 10
  assert validation.tolist() == list(range(length - length // 10, length))
  assert train.tolist() == list(range(length - length // 10))
  train, validation = split_stream(stream, 0.25)
  assert len(validation) == length // 4 and len(train) + len(validation) == length
  assert len(split_stream(stream, 0.0)[1]) == 0


def test_corpus_split_is_deterministic(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"x" * 500)
  (tmp_path / "b.txt").write_bytes(b"y" * 300)
  config = DataConfig(source=str(tmp_path), seq_len=16)
  first, second = ByteCorpus.load(config), ByteCorpus.load(config)
  stream = frame_documents([b"x" * 500, b"y" * 300])
  assert first.num_documents == 2
  np.testing.assert_array_equal(first.validation_tokens, stream[len(stream) - len(stream) // 10:])
  np.testing.assert_array_equal(first.train_tokens, stream[:len(stream) - len(stream) // 10])
  np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
  np.testing.assert_array_equal(first.validation_tokens, second.validation_tokens)


def test_train_split_smaller_than_a_row_is_a_clear_error(tmp_path):
  (tmp_path / "tiny.txt").write_bytes(b"hello")
  with pytest.raises(DataError, match=r"seq-len") as error:
    ByteCorpus.load(DataConfig(source=str(tmp_path / "tiny.txt"), seq_len=64))
  assert "\n" not in str(error.value) and "65" in str(error.value)


@pytest.mark.parametrize("field,value", [("seq_len", 0), ("batch_size", -1), ("val_fraction", 1.0),
                                         ("val_fraction", -0.1), ("seed", -3), ("max_bytes", 0), ("source", "")])
def test_data_config_rejects_bad_values(field, value):
  with pytest.raises(DataError, match=field):
    DataConfig(**{field: value})


# The grain training pipeline.


def small_corpus(seq_len=8, documents=40):
  config = DataConfig(source="unused", seq_len=seq_len, batch_size=4, val_fraction=0.1)
  return ByteCorpus.from_documents(random_documents(7, count=documents, max_length=30), config)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(left, right):
  assert len(left) == len(right)
  for left_batch, right_batch in zip(left, right):
    for key in left_batch:
      np.testing.assert_array_equal(left_batch[key], right_batch[key], err_msg=key)


def row_index_of(corpus, seq_len, inputs, targets):
  """Which train row a batch row is (rows can repeat in content, so match inputs and targets)."""
  matches = [index for index in range(num_rows(len(corpus.train_tokens), seq_len))
             if (pack_rows(corpus.train_tokens, seq_len, index)["inputs"] == inputs).all()
             and (pack_rows(corpus.train_tokens, seq_len, index)["targets"] == targets).all()]
  assert matches
  return matches[0]


def test_train_batches_are_rows_and_seeded_shuffles_are_deterministic():
  corpus = small_corpus()
  config = DataConfig(source="unused", seq_len=8, batch_size=4, seed=3)
  batches = take(train_iterator(corpus, config, process_index=0, process_count=1), 6)
  assert_batches_equal(batches, take(train_iterator(corpus, config, process_index=0, process_count=1), 6))
  other_seed = take(train_iterator(corpus, DataConfig(source="unused", seq_len=8, batch_size=4, seed=4),
                                   process_index=0, process_count=1), 6)
  assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(batches, other_seed))
  for batch in batches:
    assert set(batch) == {"inputs", "targets", "segment_ids", "loss_mask"}
    assert batch["inputs"].shape == (4, 8) and batch["loss_mask"].dtype == np.float32
    for row in range(4):
      index = row_index_of(corpus, 8, batch["inputs"][row], batch["targets"][row])
      expected = pack_rows(corpus.train_tokens, 8, index)
      for key in expected:
        np.testing.assert_array_equal(batch[key][row], expected[key])


def test_each_epoch_visits_every_row_once_in_a_new_order():
  corpus = small_corpus(seq_len=8)
  total_rows = num_rows(len(corpus.train_tokens), 8)
  config = DataConfig(source="unused", seq_len=8, batch_size=1, seed=0)
  iterator = train_iterator(corpus, config, process_index=0, process_count=1)
  epochs = []
  for _ in range(2):
    epochs.append([row_index_of(corpus, 8, batch["inputs"][0], batch["targets"][0])
                   for batch in take(iterator, total_rows)])
  # Rows with identical content would make row_index_of ambiguous; the random corpus has none.
  assert sorted(epochs[0]) == list(range(total_rows)) and sorted(epochs[1]) == list(range(total_rows))
  assert epochs[0] != list(range(total_rows)) and epochs[0] != epochs[1]


def test_iterator_state_restores_the_same_batch_sequence():
  corpus = small_corpus()
  config = DataConfig(source="unused", seq_len=8, batch_size=4, seed=1)
  iterator = train_iterator(corpus, config, process_index=0, process_count=1)
  take(iterator, 5)
  state = iterator.get_state()
  continued = take(iterator, 7)
  resumed_iterator = train_iterator(corpus, config, process_index=0, process_count=1)
  resumed_iterator.set_state(state)
  assert_batches_equal(take(resumed_iterator, 7), continued)


def test_orbax_checkpoints_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain

  corpus = small_corpus()
  config = DataConfig(source="unused", seq_len=8, batch_size=4, seed=2)
  iterator = train_iterator(corpus, config, process_index=0, process_count=1)
  take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    continued = take(iterator, 4)
    fresh = train_iterator(corpus, config, process_index=0, process_count=1)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 4), continued)


def test_process_shards_concatenate_to_the_global_batch():
  corpus = small_corpus()
  config = DataConfig(source="unused", seq_len=8, batch_size=6, seed=5)
  global_batches = take(train_iterator(corpus, config, process_index=0, process_count=1), 5)
  shards = [take(train_iterator(corpus, config, process_index=index, process_count=3), 5) for index in range(3)]
  for step, global_batch in enumerate(global_batches):
    for key in global_batch:
      assert all(shard[step][key].shape == (2, 8) for shard in shards)
      np.testing.assert_array_equal(np.concatenate([shard[step][key] for shard in shards]), global_batch[key])
  with pytest.raises(DataError, match="divisible"):
    train_iterator(corpus, config, process_index=0, process_count=4)
  with pytest.raises(DataError):
    train_iterator(corpus, config, process_index=2, process_count=2)


# Sources.


def test_file_directory_and_glob_sources(tmp_path):
  (tmp_path / "sub" / "deeper").mkdir(parents=True)
  contents = {"b.txt": b"bee", "a.md": b"ay\x00", "sub/c.txt": b"sea", "sub/deeper/d.txt": b"dee"}
  for name, data in contents.items():
    (tmp_path / name).write_bytes(data)
  assert load_documents(str(tmp_path / "b.txt")) == [b"bee"]
  # Directory: recursive, sorted by relative path ("a.md" < "b.txt" < "sub/...").
  assert load_documents(str(tmp_path)) == [b"ay\x00", b"bee", b"sea", b"dee"]
  assert load_documents(str(tmp_path / "**" / "*.txt")) == [b"bee", b"sea", b"dee"]
  assert load_documents(str(tmp_path / "*.txt")) == [b"bee"]
  assert load_documents(str(tmp_path), max_bytes=5) == [b"ay\x00", b"be"]


def test_stdlib_source_respects_max_bytes():
  documents = load_documents("stdlib", max_bytes=5000)
  assert sum(map(len, documents)) == 5000
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  first_files = []
  for parent, directories, files in os.walk(root):
    directories[:] = [name for name in directories if name not in ("site-packages", "dist-packages")]
    first_files += [pathlib.Path(parent, name) for name in files if name.endswith(".py")]
  first_files.sort(key=lambda path: path.relative_to(root).parts)
  expected = b"".join(path.read_bytes() for path in first_files[:len(documents)])[:5000]
  assert b"".join(documents) == expected
  assert not any("site-packages" in str(path) for path in first_files)


def error_message(spec, **kwargs):
  with pytest.raises(DataError) as error:
    load_documents(spec, **kwargs)
  message = str(error.value)
  assert message and "\n" not in message
  return message


def test_source_errors_are_one_line(tmp_path):
  assert "no such file" in error_message(str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_bytes(b"")
  assert "empty" in error_message(str(tmp_path / "empty.txt"))
  (tmp_path / "empty_dir").mkdir()
  assert "no files" in error_message(str(tmp_path / "empty_dir"))
  assert "matches no files" in error_message(str(tmp_path / "*.nothing"))
  assert "bytescale_unknown_dataset" in error_message("tfds:bytescale_unknown_dataset:text", data_dir=str(tmp_path))
  assert "tfds:NAME" in error_message("tfds:no_feature_given")


# TFDS, without TensorFlow.


def test_tfds_builder_round_trip(tmp_path):
  from bytescale.data.tfds_builder import DATASET_NAME, build_text_dataset

  files = tmp_path / "files"
  files.mkdir()
  contents = [b"first file\n", b"second \x00 file with a NUL", "third, caf\u00e9".encode("utf-8") + b"\xff"]
  for index, data in enumerate(contents):
    (files / f"{index}.txt").write_bytes(data)
  data_dir = tmp_path / "tfds"
  builder = build_text_dataset(str(files / "*.txt"), data_dir)
  assert builder.info.splits["train"].num_examples == 3
  assert load_documents(f"tfds:{DATASET_NAME}:text", data_dir=str(data_dir)) == contents
  assert "has no feature" in error_message(f"tfds:{DATASET_NAME}:nope", data_dir=str(data_dir))
  assert "not prepared" in error_message(f"tfds:{DATASET_NAME}:text", data_dir=str(tmp_path / "elsewhere"))
  corpus = ByteCorpus.load(DataConfig(source=f"tfds:{DATASET_NAME}:text", tfds_data_dir=str(data_dir), seq_len=8))
  assert corpus.num_documents == 3
