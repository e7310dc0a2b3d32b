"""The ``chars`` suite's generator: CUTE-style character tasks (Edman et al. 2024) on words of the evaluated text.

The word list is the evaluated text's own: runs of letters, lower-cased, 4 to 10 characters, the most frequent
``vocabulary`` of them (ties alphabetical). Six kinds of task, each a few-shot prompt (``shots`` solved examples
of the same kind on other words, one per line, then the query), answered on the same line and ended by a newline:

============  ==============================================  =====================
kind          line                                            answer
============  ==============================================  =====================
spell         ``spell "there": ``                             ``t h e r e``
reverse       ``reverse "there": ``                           ``ereht``
insert        ``add "x" after every "e" in "there": ``        ``thexrex``
delete        ``delete every "e" from "there": ``             ``thr``
substitute    ``replace every "e" with "x" in "there": ``     ``thxrx``
orth          ``closest in spelling to "there": "three",``    ``three`` (strictly the
              ``"where", "stone" or "about"? ``               least edit distance)
============  ==============================================  =====================

Each task is scored twice: greedy generation must produce the answer exactly (:class:`GenerationTask`), and the
answer must have a higher log-likelihood than three distractors (:class:`ChoiceTask`). Distractors have the
answer's length in bytes, so length never decides and a model with no preference scores exactly the chance 1/4:
first the task done wrongly where that keeps the length (the operation on another letter that occurs as often,
inserted before instead of after, the word left unchanged, spelled or reversed the wrong way round; for ``orth``
the other candidates), then near misses of the answer (two neighbouring letters swapped, or a letter replaced by
another letter of the same answer, so letter frequencies alone do not give them away).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string

import numpy as np

from bytescale.evals.tasks import ChoiceTask, GenerationTask, as_text, rng_for

KINDS = ("spell", "reverse", "insert", "delete", "substitute", "orth")
NUM_OPTIONS = 4
_WORD = re.compile(r"[^\W\d_]+")
_LETTERS = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class CharTask:
  """One solved instance: ``kind``, ``word``, its ``params`` (``insert``/``substitute``: (char, new char);
  ``delete``: (char,); ``orth``: the candidate words in the order shown), the ``answer`` and the few-shot
  ``prompt`` (``shots`` solved tasks on other words, then this one's line up to its answer)."""

  kind: str
  word: str
  params: tuple[str, ...]
  answer: str
  prompt: str
  options: tuple[str, ...]  # the answer and its distractors, in the order scored
  correct: int
  shots: tuple[CharTask, ...] = ()

  def generation(self) -> GenerationTask:
    return GenerationTask(self.kind, self.prompt.encode(), self.answer.encode())

  def choice(self) -> ChoiceTask:
    return ChoiceTask(self.kind, self.prompt.encode(), tuple((o + "\n").encode() for o in self.options), self.correct)


def word_list(text: bytes | str, *, vocabulary: int = 1000, min_chars: int = 4, max_chars: int = 10) -> list[str]:
  """The most frequent words of ``text`` (letters only, lower-cased) of ``min_chars..max_chars`` characters."""
  counts = collections.Counter(w.lower() for w in _WORD.findall(as_text(text)))
  words = [w for w in counts if min_chars <= len(w) <= max_chars and _WORD.fullmatch(w)]
  words.sort(key=lambda w: (-counts[w], w))
  return words[:vocabulary]


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions, substitutions), one row at a time."""
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def instruction(kind: str, word: str, params: tuple[str, ...]) -> str:
  """The task's line up to (and including the space before) its answer."""
  if kind == "spell":
    return f'spell "{word}": '
  if kind == "reverse":
    return f'reverse "{word}": '
  if kind == "insert":
    return f'add "{params[1]}" after every "{params[0]}" in "{word}": '
  if kind == "delete":
    return f'delete every "{params[0]}" from "{word}": '
  if kind == "substitute":
    return f'replace every "{params[0]}" with "{params[1]}" in "{word}": '
  if kind == "orth":
    quoted = [f'"{c}"' for c in params]
    return f'closest in spelling to "{word}": {", ".join(quoted[:-1])} or {quoted[-1]}? '
  raise ValueError(f"chars task kind must be one of {KINDS}, got {kind!r}")


def _near_misses(letters: str, rng: np.random.Generator, count: int) -> list[str]:
  """Strings of the same length as ``letters``: one adjacent pair of different letters swapped, or one letter
  replaced by another letter of ``letters`` (so letter frequencies alone do not give them away)."""
  out, pool = [], sorted(set(letters) - {" "})
  for _ in range(8 * count):
    i = int(rng.integers(len(letters)))
    if letters[i] == " ":
      continue
    if rng.random() < 0.5 and i + 1 < len(letters) and letters[i] != letters[i + 1]:
      out.append(letters[:i] + letters[i + 1] + letters[i] + letters[i + 2:])
    elif len(pool) > 1:
      new = pool[int(rng.integers(len(pool)))]
      if new != letters[i] and len(new.encode()) == len(letters[i].encode()):
        out.append(letters[:i] + new + letters[i + 1:])
  return out


def _wrong_letters(word: str, char: str) -> list[str]:
  """The other letters of ``word`` that occur as often as ``char``: the same operation applied to one of them
  gives an answer of the same length ("the wrong letter" distractors)."""
  return [c for c in sorted(set(word)) if c != char and word.count(c) == word.count(char)
          and len(c.encode()) == len(char.encode())]


def _solve(kind: str, word: str, rng: np.random.Generator, words: list[str]):
  """``(params, answer, distractor candidates)`` for ``word``, or None when the kind does not fit it. Candidates
  come best first: the task done wrongly (the wrong letter, the wrong direction), then near misses."""
  if kind == "spell":
    return (), " ".join(word), [" ".join(word[::-1])] + [" ".join(m) for m in _near_misses(word, rng, 6)]
  if kind == "reverse":
    if word == word[::-1]:
      return None
    return (), word[::-1], [word] + _near_misses(word[::-1], rng, 6)
  unused = [c for c in _LETTERS if c not in word]
  char = word[int(rng.integers(len(word)))]
  wrong = _wrong_letters(word, char)
  if kind == "insert":
    new = unused[int(rng.integers(len(unused)))]
    answer = word.replace(char, char + new)
    return ((char, new), answer, [word.replace(char, new + char)] + [word.replace(c, c + new) for c in wrong]
            + _near_misses(answer, rng, 6))
  if kind == "delete":
    answer = word.replace(char, "")
    if not answer:
      return None
    return (char,), answer, [word.replace(c, "") for c in wrong] + _near_misses(answer, rng, 6)
  if kind == "substitute":
    new = unused[int(rng.integers(len(unused)))]
    answer = word.replace(char, new)
    return (char, new), answer, [word] + [word.replace(c, new) for c in wrong] + _near_misses(answer, rng, 6)
  if kind == "orth":
    pool = [w for w in words if w != word and len(w.encode()) == len(word.encode())]
    if len(pool) < NUM_OPTIONS:
      return None
    sample = [pool[int(i)] for i in rng.choice(len(pool), size=min(len(pool), 200), replace=False)]
    distances = {w: edit_distance(word, w) for w in sample}
    best = min(distances.values())
    closest = sorted(w for w, d in distances.items() if d == best)
    far = sorted(w for w, d in distances.items() if d >= best + 2)
    if len(far) < NUM_OPTIONS - 1:
      return None
    answer = closest[int(rng.integers(len(closest)))]
    picked = [far[int(i)] for i in rng.choice(len(far), size=NUM_OPTIONS - 1, replace=False)]
    shown = [answer] + picked
    rng.shuffle(shown)
    return tuple(shown), answer, picked
  raise ValueError(f"chars task kind must be one of {KINDS}, got {kind!r}")


def _task(kind: str, word: str, rng: np.random.Generator, words: list[str]) -> CharTask | None:
  solved = _solve(kind, word, rng, words)
  if solved is None:
    return None
  params, answer, candidates = solved
  size = len(answer.encode())
  distractors = []
  for candidate in candidates:
    if candidate != answer and candidate not in distractors and len(candidate.encode()) == size:
      distractors.append(candidate)
  if len(distractors) < NUM_OPTIONS - 1:
    return None
  options = [answer] + distractors[:NUM_OPTIONS - 1]
  order = rng.permutation(NUM_OPTIONS)
  options = tuple(options[int(i)] for i in order)
  return CharTask(kind, word, params, answer, instruction(kind, word, params), options,
                  options.index(answer))


def generate(text: bytes | str, *, seed: int = 0, examples: int = 24, shots: int = 3, kinds=KINDS,
             vocabulary: int = 1000) -> list[CharTask]:
  """``examples`` tasks of each kind (words drawn without replacement while they last), each with ``shots``
  solved examples of its kind on other words in its prompt."""
  words = word_list(text, vocabulary=vocabulary)
  if len(words) < shots + NUM_OPTIONS + 1:
    raise ValueError(f"the evaluation text has only {len(words)} distinct words of 4-10 letters; the chars suite "
                     "needs more: pass a longer --data file")
  tasks = []
  for kind in kinds:
    rng = rng_for(seed, "chars", kind)
    made = []
    for index in rng.permutation(len(words)):
      if len(made) == examples:
        break
      task = _task(kind, words[int(index)], rng, words)
      if task is None:
        continue
      demos = []
      for other in rng.permutation(len(words)):
        if len(demos) == shots:
          break
        if words[int(other)] != task.word:
          demo = _task(kind, words[int(other)], rng, words)
          if demo is not None:
            demos.append(demo)
      prompt = "".join(f"{d.prompt}{d.answer}\n" for d in demos) + task.prompt
      made.append(dataclasses.replace(task, prompt=prompt, shots=tuple(demos)))
    if len(made) < examples:
      raise ValueError(f"the evaluation text gives only {len(made)} {kind!r} tasks of the {examples} asked for; "
                       "pass a longer --data file or fewer --examples")
    tasks += made
  return tasks
