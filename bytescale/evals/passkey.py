"""The ``passkey`` suite's generator: a random key hidden in filler text, retrieved at the end (LongRoPE's test).

A prompt of at most ``length`` bytes (ASCII; whole filler sentences, so a few bytes short of it) is::

    <filler, first part> The pass key is 71432. Remember it. <filler, rest> What is the pass key? The pass key is

and the answer is the key (``digits`` random digits, the first non-zero). The filler repeats the classic sentences
("The grass is green. The sky is blue. ...", no digits, so the key occurs exactly once). The key sentence goes in
at the sentence boundary of the filler nearest to ``depth`` of the filler's length (0 = first, 1 = last, just
before the question); :class:`PasskeyTask` records the depth it actually got and the key's byte offset.
Greedy generation must produce the key's digits exactly.
"""

from __future__ import annotations

import dataclasses

from bytescale.evals.tasks import GenerationTask, rng_for

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. "
QUESTION = "What is the pass key? The pass key is "
DEPTHS = (0.1, 0.5, 0.9)


@dataclasses.dataclass(frozen=True)
class PasskeyTask:
  length: int  # the length asked for: the prompt has at most this many bytes (whole filler sentences)
  nominal_depth: float  # the depth asked for (names the score)
  depth: float  # filler bytes before the key sentence / all filler bytes
  key: str
  key_offset: int  # byte offset of the key's first digit in the prompt
  prompt: str

  @property
  def name(self) -> str:
    return f"N={self.length}/depth={self.nominal_depth:g}"

  def generation(self) -> GenerationTask:
    return GenerationTask(self.name, self.prompt.encode(), self.key.encode())


def min_length(digits: int = 5) -> int:
  """The shortest prompt with any filler at all."""
  return len(KEY_SENTENCE.format(key="0" * digits)) + len(QUESTION) + len(FILLER)


def _sentences() -> list[str]:
  return [sentence + ". " for sentence in FILLER.split(". ") if sentence]


def make_task(length: int, depth: float, key: str) -> PasskeyTask:
  key_sentence = KEY_SENTENCE.format(key=key)
  room = length - len(key_sentence) - len(QUESTION)
  if room < len(FILLER):
    raise ValueError(f"passkey length {length} is too short: it needs at least {min_length(len(key))} bytes "
                     "(key sentence, question and one round of filler); pass larger --passkey-lengths")
  # Whole filler sentences, cycled, as many as fit; the key goes in at the sentence start nearest the depth.
  sentences, cycle = [], _sentences()
  while sum(map(len, sentences)) + len(cycle[len(sentences) % len(cycle)]) <= room:
    sentences.append(cycle[len(sentences) % len(cycle)])
  filler_bytes = sum(map(len, sentences))
  boundaries = [sum(map(len, sentences[:i])) for i in range(len(sentences) + 1)]
  split = min(boundaries, key=lambda b: (abs(b - depth * filler_bytes), b))
  filler = "".join(sentences)
  prompt = filler[:split] + key_sentence + filler[split:] + QUESTION
  return PasskeyTask(length, depth, split / filler_bytes, key, split + key_sentence.index(key), prompt)


def generate(lengths, *, seed: int = 0, examples: int = 4, depths=DEPTHS, digits: int = 5) -> list[PasskeyTask]:
  """``examples`` tasks per (length, depth), each with its own random key."""
  tasks = []
  for length in lengths:
    for depth in depths:
      rng = rng_for(seed, "passkey", str(length), f"{depth:g}")
      for _ in range(examples):
        key = str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))
        tasks.append(make_task(int(length), float(depth), key))
  return tasks
