"""The suites end to end: generate a suite's tasks, score them with a :class:`~bytescale.evals.scoring.Scorer`,
and reduce the scores to one flat dict per suite (what ``bytescale eval --suite`` prints).

Every score is a mean over the suite's examples; accuracies are fractions in [0, 1]. Sizes follow the model's
training length ``seq_len`` (:meth:`SuiteSettings.for_seq_len`), so that rows stay within what it trained on
except where a suite measures length itself (``passkey`` at twice it).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np

from bytescale import configs
from bytescale.evals import chars, induction, noise, passkey
from bytescale.evals.scoring import Scorer, padded_width, top_choice_credit

SUITE_NAMES = ("noise", "chars", "passkey", "induction")
TEXT_SUITES = ("noise", "chars")  # the suites that draw from the evaluated text


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
  """Sizes of every suite; ``examples`` (None: each suite's default) is per task (per score)."""

  seed: int = 0
  examples: int | None = None
  context_chars: int = 128  # noise: context of each window
  continuation_chars: int = 64  # noise: the clean continuation that is scored
  noise_levels: tuple[float, ...] = noise.LEVELS
  shots: int = 2  # chars: solved examples in each prompt
  passkey_lengths: tuple[int, ...] = (128, 256, 512)
  passkey_depths: tuple[float, ...] = passkey.DEPTHS
  induction_lengths: tuple[int, ...] = induction.LENGTHS

  @classmethod
  def for_seq_len(cls, seq_len: int, **overrides) -> SuiteSettings:
    """Defaults for a model trained on rows of ``seq_len`` bytes: noise rows within it (half context, a quarter
    continuation, room for repeats), chars prompts with 1 shot per 128 bytes (1 to 3), passkey at half, once and
    twice ``seq_len`` (at least :func:`passkey.min_length`), induction copies of 16 and ``seq_len / 4`` bytes."""
    if seq_len < 32:
      raise configs.ConfigError(f"seq_len {seq_len} is too short for the evaluation suites (at least 32)")
    lengths = tuple(sorted({max(passkey.min_length(), n) for n in (seq_len // 2, seq_len, 2 * seq_len)}))
    defaults = dict(context_chars=seq_len // 2, continuation_chars=seq_len // 4,
                    shots=max(1, min(3, seq_len // 128)), passkey_lengths=lengths,
                    induction_lengths=tuple(sorted({16, max(2, seq_len // 4)})))
    return cls(**{**defaults, **overrides})


def _examples(settings: SuiteSettings, default: int) -> int:
  return default if settings.examples is None else settings.examples


def run_noise(scorer: Scorer, text: bytes, settings: SuiteSettings) -> dict:
  examples = noise.generate(text, seed=settings.seed, examples=_examples(settings, 32),
                            context_chars=settings.context_chars, continuation_chars=settings.continuation_chars,
                            levels=settings.noise_levels)
  spans = [e.span() for e in examples]
  scores = scorer.teacher_forced([s.row for s in spans], desc="noise")
  bits, count = collections.defaultdict(float), collections.defaultdict(int)
  for span, score in zip(spans, scores):
    bits[span.name] += score.bits(span.start, span.end)
    count[span.name] += span.end - span.start
  clean = bits["clean"] / count["clean"]
  out = {"clean_bpb": clean}
  out.update({name: bits[name] / count[name] - clean for name in bits if name != "clean"})
  return out


def run_chars(scorer: Scorer, text: bytes, settings: SuiteSettings) -> dict:
  tasks = chars.generate(text, seed=settings.seed, examples=_examples(settings, 24), shots=settings.shots)
  max_new = max(len(t.answer.encode()) for t in tasks) + 1  # the answer and its newline
  generated = scorer.greedy([t.prompt.encode() for t in tasks], max_new, desc="chars (generate)")
  likelihoods = scorer.choices([t.choice() for t in tasks], desc="chars (choices)")
  exact, choice, chance = (collections.defaultdict(list) for _ in range(3))
  for task, text_out, log2_likelihoods in zip(tasks, generated, likelihoods):
    exact[task.kind].append(float(text_out.split(b"\n")[0] == task.answer.encode()))
    choice[task.kind].append(top_choice_credit(log2_likelihoods, task.correct))
    chance[task.kind].append(1.0 / len(task.options))
  out = {}
  for kind in exact:
    out[f"{kind}/exact"] = float(np.mean(exact[kind]))
    out[f"{kind}/choice"] = float(np.mean(choice[kind]))
  out["exact"] = float(np.mean([v for kind in exact for v in exact[kind]]))
  out["choice"] = float(np.mean([v for kind in choice for v in choice[kind]]))
  out["choice_chance"] = float(np.mean([v for kind in chance for v in chance[kind]]))
  return out


def run_passkey(scorer: Scorer, text: bytes, settings: SuiteSettings) -> dict:
  del text  # the filler is fixed (passkey.FILLER)
  tasks = passkey.generate(settings.passkey_lengths, seed=settings.seed, examples=_examples(settings, 4),
                           depths=settings.passkey_depths)
  hits = collections.defaultdict(list)
  for length in settings.passkey_lengths:
    group = [t for t in tasks if t.length == length]
    generated = scorer.greedy([t.prompt.encode() for t in group], len(group[0].key), desc=f"passkey N={length}")
    for task, out in zip(group, generated):
      hits[task.name].append(float(out == task.key.encode()))
  out = {name: float(np.mean(v)) for name, v in hits.items()}
  for length in settings.passkey_lengths:
    out[f"N={length}"] = float(np.mean([v for name, vs in hits.items() if name.startswith(f"N={length}/")
                                        for v in vs]))
  out["mean"] = float(np.mean([v for vs in hits.values() for v in vs]))
  return out


def run_induction(scorer: Scorer, text: bytes, settings: SuiteSettings) -> dict:
  del text  # random strings
  tasks = induction.generate(seed=settings.seed, examples=_examples(settings, 32),
                             lengths=settings.induction_lengths)
  width = padded_width(2 * max(settings.induction_lengths) + 1)  # one compilation for every length
  scores = scorer.teacher_forced([t.sequence for t in tasks], width=width, desc="induction")
  credit = collections.defaultdict(list)
  for task, score in zip(tasks, scores):
    for span in (task.second_copy(), task.first_copy()):
      credit[span.name].extend(score.credit[span.start:span.end])
    if score.head_credit is not None:
      for h in range(1, score.head_credit.shape[0]):  # head h sees the copy start once t - h - 1 >= length
        credit[f"{task.name}/head{h + 1}"].extend(score.head_credit[h, task.length + 1 + h:2 * task.length])
  out = {name: float(np.mean(v)) for name, v in credit.items()}
  out["chance"] = 1.0 / 256
  return out


SUITES: dict[str, Callable[[Scorer, bytes, SuiteSettings], dict]] = {
    "noise": run_noise, "chars": run_chars, "passkey": run_passkey, "induction": run_induction,
}


def parse_suites(spec: str) -> tuple[str, ...]:
  """``--suite noise,chars`` -> ("noise", "chars"); ``all`` is every suite."""
  names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
  if names == ("all",):
    return SUITE_NAMES
  unknown = [n for n in names if n not in SUITES]
  if unknown or not names:
    raise configs.ConfigError(f"--suite: unknown suite(s) {unknown or [spec]}; choose from {', '.join(SUITE_NAMES)} "
                              "(comma-separated) or all")
  return names


def run_suites(model, names, text: bytes, settings: SuiteSettings, *, batch_size: int = 16,
               progress: bool = True) -> dict:
  """Runs each named suite on ``model``; returns ``{"seed", "bytes_evaluated", "suites": {name: {"scores",
  "bytes_evaluated"}}}`` (bytes evaluated: bytes the model read or generated, padding excluded)."""
  scorer = Scorer(model, batch_size=batch_size, progress=progress)
  results = {}
  for name in names:
    before = scorer.bytes_evaluated
    scores = SUITES[name](scorer, text, settings)
    results[name] = {"scores": {k: round(float(v), 5) for k, v in scores.items()},
                     "bytes_evaluated": scorer.bytes_evaluated - before}
  return {"seed": settings.seed, "bytes_evaluated": scorer.bytes_evaluated, "suites": results}


def held_out_text(data_config: dict) -> bytes:
  """The validation split of a run's training data (the ``data_config`` of its checkpoint meta), as bytes with
  document boundaries as newlines: text the model never trained on."""
  from bytescale.data.pipeline import frame_documents, split_stream
  from bytescale.data.sources import load_documents

  documents = load_documents(data_config["source"], max_bytes=data_config.get("max_bytes"),
                             data_dir=data_config.get("tfds_data_dir"))
  _, validation = split_stream(frame_documents(documents), data_config.get("val_fraction", 0.1))
  if len(validation) == 0:
    raise configs.ConfigError("the run held out no validation data (val_fraction=0); pass --data PATH")
  return stream_text(validation)


def stream_text(tokens) -> bytes:
  """A framed token stream (``data.pipeline.frame_documents``) as bytes, BOS/EOS as newlines."""
  tokens = np.asarray(tokens)
  return np.where(tokens < 256, tokens, ord("\n")).astype(np.uint8).tobytes()
