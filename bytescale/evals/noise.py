"""The ``noise`` suite's generator: held-out windows whose context is perturbed, continuation kept clean.

For each window of the evaluated text (``context_chars`` characters then ``continuation_chars`` more), the
context is perturbed at each level by each kind of noise (BLT's noised-input robustness, in the spirit of its
noisy HellaSwag):

* ``case``: flip the case of a character (only characters whose case flips to one other character and back);
* ``drop``: delete a character;
* ``repeat``: write a character twice;
* ``swap``: exchange a character with the next one (when they differ; the pair is then done);
* ``mixed``: each chosen character gets one of the four above, drawn uniformly.

Every character of the context is chosen independently with probability ``level``; a chosen character whose
kind cannot apply (``case`` on a digit, ``swap`` before an equal character or at the end) stays as it is. All of
it works on characters, so a multi-byte UTF-8 character is flipped, dropped, repeated or moved whole, never cut.
The scorer measures the bits per byte of the same clean continuation after each context; the suite reports the
increase over the clean context.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bytescale.evals.tasks import ScoredSpan, as_text, rng_for, windows

KINDS = ("case", "drop", "repeat", "swap")
MIXED = "mixed"
LEVELS = (0.05, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class Edit:
  index: int  # character index in the clean context (for ``swap``: the first of the two characters)
  kind: str  # one of KINDS


def flips_case(char: str) -> bool:
  swapped = char.swapcase()
  return swapped != char and len(swapped) == 1 and swapped.swapcase() == char


def perturb(text: str, level: float, kind: str, rng: np.random.Generator) -> tuple[str, tuple[Edit, ...]]:
  """``text`` with noise of ``kind`` (one of KINDS or ``mixed``) at ``level``; returns it and the edits made."""
  if kind not in KINDS + (MIXED,):
    raise ValueError(f"noise kind must be one of {KINDS + (MIXED,)}, got {kind!r}")
  if not 0.0 <= level <= 1.0:
    raise ValueError(f"noise level must be a probability in [0, 1], got {level}")
  chosen = rng.random(len(text)) < level
  drawn = rng.integers(len(KINDS), size=len(text))  # drawn for every character: the stream never depends on text
  out, edits = [], []
  i = 0
  while i < len(text):
    char = text[i]
    op = (KINDS[drawn[i]] if kind == MIXED else kind) if chosen[i] else None
    if op == "case" and flips_case(char):
      out.append(char.swapcase())
    elif op == "drop":
      pass
    elif op == "repeat":
      out.append(char + char)
    elif op == "swap" and i + 1 < len(text) and text[i + 1] != char:
      out.append(text[i + 1] + char)
      edits.append(Edit(i, op))
      i += 2
      continue
    else:
      out.append(char)
      i += 1
      continue
    edits.append(Edit(i, op))
    i += 1
  return "".join(out), tuple(edits)


@dataclasses.dataclass(frozen=True)
class NoiseExample:
  """One window under one condition: ``kind`` and ``level`` (``clean`` at level 0 has no edits)."""

  window: int
  kind: str
  level: float
  clean_context: str
  context: str
  continuation: str
  edits: tuple[Edit, ...]

  @property
  def name(self) -> str:
    return "clean" if self.kind == "clean" else f"{self.kind}@{self.level:g}"

  def span(self) -> ScoredSpan:
    context, continuation = self.context.encode(), self.continuation.encode()
    return ScoredSpan(self.name, context + continuation, len(context), len(context) + len(continuation),
                      group=self.window)


def generate(text: bytes | str, *, seed: int = 0, examples: int = 32, context_chars: int = 128,
             continuation_chars: int = 64, levels=LEVELS, kinds=KINDS + (MIXED,)) -> list[NoiseExample]:
  """Every window clean and under every (kind, level): ``examples * (1 + len(kinds) * len(levels))`` examples."""
  base = windows(as_text(text), examples, context_chars + continuation_chars, rng_for(seed, "noise", "windows"))
  out = []
  for w, window in enumerate(base):
    context, continuation = window[:context_chars], window[context_chars:]
    out.append(NoiseExample(w, "clean", 0.0, context, context, continuation, ()))
    for kind in kinds:
      for level in levels:
        rng = rng_for(seed, "noise", kind, f"{level:g}", str(w))
        noised, edits = perturb(context, level, kind, rng)
        out.append(NoiseExample(w, kind, level, context, noised, continuation, edits))
  return out
