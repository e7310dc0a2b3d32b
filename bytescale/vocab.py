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
