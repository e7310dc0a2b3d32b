"""Token layout shared by every model.

ids 0..255 are the byte values themselves (NUL is id 0 and is trained on like any other byte), then special
ids: BOS 256 (opens a document), EOS 257 (closes it), PAD 258 (fills unused slots; never a loss target, masked
by ``loss_mask``, never by its value), and 259 reserved for model-specific markers. ``VOCAB_SIZE`` is 260.
"""

NUM_BYTES = 256
BOS = 256
EOS = 257
PAD = 258
RESERVED = 259
VOCAB_SIZE = 260


def encode(text: str | bytes) -> list[int]:
  """UTF-8 bytes of ``text`` as ids (no BOS/EOS)."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return list(data)


def decode(ids) -> bytes:
  """Bytes of the byte ids in ``ids``; special ids are dropped."""
  return bytes(int(i) for i in ids if 0 <= int(i) < NUM_BYTES)


# --- The BLT reference layout ----------------------------------------------------------------------------
# The BLT reference code and Hugging Face's BltForCausalLM number ids differently: BOE 0, BOS 1, EOS 2,
# BPE delimiter 3, byte b -> b + 4. Both layouts have 260 ids, so one is a permutation of the other: PAD stands
# for BOE (0) and RESERVED for the BPE delimiter (3). Converters permute embedding rows and output columns with
# these tables, so log-probabilities, bits per byte and generation are the same in both layouts.
REFERENCE_OFFSET = 4
REFERENCE_BOE, REFERENCE_BOS, REFERENCE_EOS, REFERENCE_BPE = 0, 1, 2, 3


def reference_id_table() -> list[int]:
  """``table[our_id]`` = the reference id of the same token (a permutation of ``range(VOCAB_SIZE)``)."""
  table = [b + REFERENCE_OFFSET for b in range(NUM_BYTES)]
  return table + [REFERENCE_BOS, REFERENCE_EOS, REFERENCE_BOE, REFERENCE_BPE]  # BOS, EOS, PAD, RESERVED


def from_reference_id_table() -> list[int]:
  """``table[reference_id]`` = our id (the inverse of ``reference_id_table``)."""
  inverse = [0] * VOCAB_SIZE
  for ours, ref in enumerate(reference_id_table()):
    inverse[ref] = ours
  return inverse
