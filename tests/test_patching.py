"""Patchers against a brute-force Python loop, the BLT worked example, document boundaries, overflow policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale import patching, vocab
from bytescale.patching import BLT_THRESHOLD, PatchingConfig

# --- Brute force: the rules of the module docstring, written as a sequential loop --------------------------


def spacelike(token):
  if token >= 256:
    return True
  c = chr(token) if token < 128 else None
  return not ((c is not None and c.isascii() and c.isalnum()) or 0x80 <= token < 0xC0)


def brute_force_starts(config, ids, segs, entropies):
  t = len(ids)
  starts = [False] * t
  since_start = 0
  for i in range(t):
    if segs[i] == 0:
      continue
    doc_start = i == 0 or segs[i - 1] != segs[i]
    pos = 0
    while not doc_start and i - pos - 1 >= 0 and segs[i - pos - 1] == segs[i]:
      pos += 1
    if pos == 0:
      opens = True
    elif config.patcher == "strided":
      opens = pos % config.stride == 0
    elif config.patcher == "space":
      prev = ids[i - 1]
      prev_prev_spacelike = pos >= 2 and spacelike(ids[i - 2])
      opens = prev >= 256 or (spacelike(prev) and not prev_prev_spacelike)
    else:
      opens = True
      if config.threshold is not None:
        opens = opens and entropies[i - 1] > config.threshold
      if config.monotonic_threshold is not None:
        opens = opens and pos >= 2 and entropies[i - 1] - entropies[i - 2] > config.monotonic_threshold
    if not opens and config.max_patch_length is not None and since_start == config.max_patch_length:
      opens = True
    since_start = 1 if opens else since_start + 1
    starts[i] = opens
  return starts


def brute_force_patches(config, ids, segs, entropies, max_patches):
  starts = brute_force_starts(config, ids, segs, entropies)
  patch_ids, lengths, overflow, current = [], [0] * max_patches, 0, -1
  for i, s in enumerate(starts):
    if segs[i] == 0:
      patch_ids.append(-1)
      continue
    current += s
    if current >= max_patches:
      overflow += 1
    pid = min(current, max_patches - 1)
    patch_ids.append(pid)
    lengths[pid] += 1
  return starts, patch_ids, lengths, overflow


ALPHABET = np.array([ord(c) for c in "ab Z9,.\n-"] + [0, 0x80, 0xA5, 0xC3, 0xE2, 0xFF, vocab.BOS, vocab.EOS])


def random_batch(rng, b, t):
  ids = rng.choice(ALPHABET, size=(b, t))
  segs = np.zeros((b, t), np.int64)
  for row in range(b):
    lengths = rng.integers(1, 12, size=t)
    segs[row] = np.repeat(np.arange(1, t + 1), lengths)[:t]
    pad = rng.integers(0, 5)
    if pad:
      segs[row, -pad:] = 0
  entropies = rng.uniform(0.0, 3.0, size=(b, t)).astype(np.float32)
  return ids, segs, entropies


CONFIGS = [
    PatchingConfig("strided", stride=1),
    PatchingConfig("strided", stride=3),
    PatchingConfig("strided", stride=4, max_patch_length=3),
    PatchingConfig("space"),
    PatchingConfig("space", max_patch_length=4),
    PatchingConfig("entropy"),
    PatchingConfig("entropy", threshold=2.0, max_patch_length=5),
    PatchingConfig("entropy", threshold=None, monotonic_threshold=0.5),
    PatchingConfig("entropy", threshold=1.0, monotonic_threshold=0.2),
    PatchingConfig("entropy", threshold=None, monotonic_threshold=-0.3, max_patch_length=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.patcher}-{c.stride}-{c.threshold}-"
                         f"{c.monotonic_threshold}-{c.max_patch_length}")
@pytest.mark.parametrize("max_patches", [48, 9])
def test_patcher_matches_brute_force(config, max_patches, rng):
  ids, segs, entropies = random_batch(rng, 4, 48)
  fn = jax.jit(lambda i, s, h: patching.patch(config, i, s, entropies_BxT=h, max_patches=max_patches))
  got = fn(jnp.asarray(ids, jnp.int32), jnp.asarray(segs, jnp.int32), jnp.asarray(entropies))
  for row in range(len(ids)):
    starts, patch_ids, lengths, overflow = brute_force_patches(config, ids[row].tolist(), segs[row].tolist(),
                                                               entropies[row].tolist(), max_patches)
    np.testing.assert_array_equal(np.asarray(got.starts_BxT[row]), starts)
    np.testing.assert_array_equal(np.asarray(got.patch_ids_BxT[row]), patch_ids)
    np.testing.assert_array_equal(np.asarray(got.lengths_BxM[row]), lengths)
    np.testing.assert_array_equal(np.asarray(got.valid_BxM[row]), np.array(lengths) > 0)
    assert int(got.overflow_bytes_B[row]) == overflow
    # No byte is ever dropped: every real byte belongs to exactly one patch.
    assert sum(lengths) == int((segs[row] != 0).sum())


def test_worked_example_from_the_reference():
  h = jnp.asarray([[3.0, 0.5, 2.0, 0.1, 0.2, 1.9, 0.3, 0.3, 0.3, 2.5]])
  p = patching.entropy(h, threshold=BLT_THRESHOLD, max_patches=10)
  assert np.asarray(p.lengths_BxM[0][p.valid_BxM[0]]).tolist() == [1, 2, 3, 4]
  with_next = patching.entropy(h, threshold=BLT_THRESHOLD, max_patches=11, include_next=True)
  assert np.asarray(with_next.lengths_BxM[0][with_next.valid_BxM[0]]).tolist() == [1, 2, 3, 4, 1]
  assert bool(patching.next_byte_opens_patch(PatchingConfig("entropy"), jnp.zeros((1, 10), jnp.int32),
                                             entropies_BxT=h)[0])


@pytest.mark.parametrize("config", CONFIGS[1:4] + CONFIGS[5:9], ids=lambda c: c.patcher)
def test_next_byte_flag_is_what_any_next_byte_gets(config, rng):
  """The generation variant's flag equals the start flag of the real next byte, whatever its value."""
  ids, _, entropies = random_batch(rng, 3, 20)
  ids, entropies = jnp.asarray(ids, jnp.int32), jnp.asarray(entropies)
  flag = patching.next_byte_opens_patch(config, ids, entropies_BxT=entropies)
  for next_byte in (ord("a"), ord(" "), vocab.EOS):
    extended = jnp.concatenate([ids, jnp.full((3, 1), next_byte, jnp.int32)], axis=1)
    h = jnp.concatenate([entropies, jnp.full((3, 1), 9.0)], axis=1)
    full = patching.patch(config, extended, entropies_BxT=h, max_patches=21)
    np.testing.assert_array_equal(np.asarray(full.starts_BxT[:, -1]), np.asarray(flag))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.patcher)
def test_patch_starts_are_causal(config, rng):
  """Changing byte t and its entropy (and everything after) never changes whether bytes <= t open patches."""
  ids, segs, entropies = random_batch(rng, 1, 40)
  segs[:] = 1
  base = patching.patch(config, jnp.asarray(ids), jnp.asarray(segs), entropies_BxT=jnp.asarray(entropies),
                        max_patches=40)
  for t in (0, 5, 17, 30):
    ids2, h2 = ids.copy(), entropies.copy()
    ids2[:, t:] = rng.choice(ALPHABET, size=ids2[:, t:].shape)
    h2[:, t:] = rng.uniform(0, 3, size=h2[:, t:].shape)
    got = patching.patch(config, jnp.asarray(ids2), jnp.asarray(segs), entropies_BxT=jnp.asarray(h2), max_patches=40)
    np.testing.assert_array_equal(np.asarray(got.starts_BxT[:, : t + 1]), np.asarray(base.starts_BxT[:, : t + 1]))


def test_document_boundaries():
  """Every document start opens a patch even where the rule says no; no patch spans two documents; the
  monotonic rule does not reach back before a document (no forced patch at its second byte)."""
  segs = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0, 0]])
  low = jnp.zeros((1, 13))
  p = patching.entropy(low, segs, threshold=1.0, max_patches=13)
  np.testing.assert_array_equal(np.asarray(p.starts_BxT[0]),
                                [1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0])
  assert np.asarray(p.patch_ids_BxT[0]).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, -1, -1]
  # Entropy jumps from the end of document 1 into document 2: no monotonic start at document 2's second byte.
  jump = jnp.asarray([[0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
  mono = patching.entropy(jump, segs, threshold=None, monotonic_threshold=1.0, max_patches=13)
  np.testing.assert_array_equal(np.asarray(mono.starts_BxT[0]), np.asarray(p.starts_BxT[0]))
  # Space rule: document 2 starts with a space. Read alone it ends a patch (nothing spacelike before it), so
  # document 2's second byte opens one, although document 1 ended with a space.
  ids = jnp.asarray([[ord(c) for c in "ab  " + " defg" + "hi"] + [0, 0]])
  space = patching.space(ids, segs, max_patches=13)
  np.testing.assert_array_equal(np.asarray(space.starts_BxT[0]),
                                [1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0])


def test_space_rule_on_text():
  text = b"Hello,  world! 12 ab\xc3\xa9c."
  ids = jnp.asarray([list(text)])
  p = patching.space(ids, max_patches=len(text))
  lengths = np.asarray(p.lengths_BxM[0][p.valid_BxM[0]]).tolist()
  pieces, start = [], 0
  for n in lengths:
    pieces.append(text[start:start + n])
    start += n
  # A spacelike byte ends its patch; UTF-8 lead bytes (0b11xxxxxx) are spacelike, continuation bytes are not.
  assert pieces == [b"Hello,", b"  world!", b" 12 ", b"ab\xc3", b"\xa9c."]


def test_overflow_merges_into_the_last_patch_and_counts():
  p = patching.strided(jnp.zeros((1, 10), jnp.int32), stride=1, max_patches=4)
  assert np.asarray(p.lengths_BxM[0]).tolist() == [1, 1, 1, 7]
  assert int(p.overflow_bytes_B[0]) == 6
  assert np.asarray(p.patch_ids_BxT[0]).tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]


def test_config_validation():
  from bytescale.configs import ConfigError

  with pytest.raises(ConfigError, match="PatchingConfig.patcher"):
    PatchingConfig("bpe")
  with pytest.raises(ConfigError, match="PatchingConfig.threshold"):
    PatchingConfig("entropy", threshold=None, monotonic_threshold=None)
  with pytest.raises(ConfigError, match="max_patches_ratio"):
    PatchingConfig("space", max_patches_ratio=0.0)
  assert PatchingConfig("space", max_patches_ratio=0.25).max_patches(100) == 25
