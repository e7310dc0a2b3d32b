"""The ``induction`` suite's generator: a random string followed by an exact copy of itself.

A row is ``s + s`` for a random string ``s`` of ``length`` bytes, drawn uniformly from an alphabet:

* ``letters``: lower-case ASCII letters (in-distribution for text models);
* ``bytes``: all 256 byte values (nothing but copying can predict them).

Within the first copy nothing predicts the next byte; in the second, every byte after its first is predictable
by copying (the first byte of the second copy is not: nothing marks where the copy starts). The scorer reports
next-byte accuracy, teacher-forced, on bytes ``1 .. length - 1`` of the second copy, and on the same positions of
the first copy as the no-copying baseline. Multi-token models are also scored per head (head k predicts the byte
k ahead).
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from bytescale.evals.tasks import ScoredSpan, rng_for

ALPHABETS = {"letters": string.ascii_lowercase.encode(), "bytes": bytes(range(256))}
LENGTHS = (16, 64)


@dataclasses.dataclass(frozen=True)
class InductionTask:
  alphabet: str
  sequence: bytes  # first copy + second copy
  length: int  # bytes of one copy

  @property
  def name(self) -> str:
    return f"{self.alphabet}/L={self.length}"

  def second_copy(self) -> ScoredSpan:
    """Bytes 1 .. length - 1 of the second copy."""
    return ScoredSpan(self.name, self.sequence, self.length + 1, 2 * self.length)

  def first_copy(self) -> ScoredSpan:
    """The same positions of the first copy (nothing to copy from yet)."""
    return ScoredSpan(self.name + "/first", self.sequence, 1, self.length)


def generate(*, seed: int = 0, examples: int = 32, lengths=LENGTHS, alphabets=tuple(ALPHABETS)) -> list[InductionTask]:
  tasks = []
  for alphabet in alphabets:
    if alphabet not in ALPHABETS:
      raise ValueError(f"induction alphabet must be one of {sorted(ALPHABETS)}, got {alphabet!r}")
    symbols = np.frombuffer(ALPHABETS[alphabet], np.uint8)
    for length in lengths:
      if length < 2:
        raise ValueError(f"induction length must be >= 2, got {length}")
      rng = rng_for(seed, "induction", alphabet, str(length))
      for _ in range(examples):
        first = symbols[rng.integers(len(symbols), size=length)].tobytes()
        tasks.append(InductionTask(alphabet, first + first, length))
  return tasks
