"""The training driver behind ``bytescale train`` and the examples.

One call trains (or resumes) a run in ``out_dir``: data -> jitted train step with donated state -> progress
bar and JSON-lines metrics -> orbax checkpoints every ``checkpoint_every`` steps and on SIGTERM/SIGINT ->
validation bits per byte. Rerunning with the same ``out_dir`` resumes from the last checkpoint, data iterator
included, so the resumed losses equal an uninterrupted run's step for step.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bytescale import configs
from bytescale.data.pipeline import ByteCorpus, DataConfig, train_iterator
from bytescale.models import build_model, model_name_for
from bytescale.train.checkpoint import Checkpointer
from bytescale.train.evaluate import evaluate_bpb
from bytescale.train.metrics import JsonlWriter
from bytescale.train.state import init_train_state, learning_rate_schedule, make_optimizer
from bytescale.train.step import make_eval_step, make_train_step, next_byte_loss

BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


@dataclasses.dataclass
class TrainResult:
  model: object
  graphdef: object
  state: object
  summary: dict


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it saves and exits)."""

  def __init__(self):
    self.raised = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.raised = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(
    model_config,
    train_config: configs.TrainConfig,
    data_config: DataConfig,
    out_dir: str,
    *,
    preset: str = "custom",
    loss_fn=next_byte_loss,
    progress: bool = True,
    corpus: ByteCorpus | None = None,
) -> TrainResult:
  tc = train_config
  model_name = model_name_for(model_config)
  os.makedirs(out_dir, exist_ok=True)
  corpus = corpus or ByteCorpus.load(data_config)
  model = build_model(model_config, seed=tc.seed)
  optimizer = make_optimizer(tc)
  graphdef, state = init_train_state(model, optimizer)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  iterator = train_iterator(corpus, data_config)
  meta = {
      "model": model_name, "preset": preset,
      "model_config": configs.to_dict(model_config),
      "train_config": configs.to_dict(tc),
      "data_config": dataclasses.asdict(data_config),
  }
  checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tc.keep_checkpoints, save_every=tc.checkpoint_every)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    _check_same_run(out_dir, meta)
    state = checkpointer.restore(state, data_iterator=iterator)
    _log(f"resuming {out_dir} from step {start_step}")

  train_step = jax.jit(make_train_step(graphdef, optimizer, loss_fn), donate_argnums=0)
  eval_fn = jax.jit(make_eval_step(graphdef, loss_fn))
  schedule = learning_rate_schedule(tc)
  metrics_file = JsonlWriter(os.path.join(out_dir, "metrics.jsonl"))
  bytes_per_step = tc.batch_size * tc.seq_len
  step = start_step
  trained_steps, train_seconds = 0, 0.0
  stopped_by = None
  rate, metrics = 0.0, {}
  bar = tqdm(total=tc.steps, initial=start_step, disable=not progress, file=sys.stderr, dynamic_ncols=True,
             desc=f"train {model_name}/{preset}")
  started = time.perf_counter()
  with _StopFlag() as stop:
    while step < tc.steps:
      batch = {k: v for k, v in next(iterator).items() if k in BATCH_KEYS}
      tick = time.perf_counter()
      state, metrics = train_step(state, batch)
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tick
      step += 1
      if trained_steps:  # the first step includes compilation
        train_seconds += elapsed
      trained_steps += 1
      rate = bytes_per_step * (trained_steps - 1) / train_seconds if train_seconds else 0.0
      if step % tc.log_every == 0 or step == tc.steps:
        record = {"step": step, "lr": float(schedule(step - 1)), "bytes_per_s": rate,
                  **{k: float(v) for k, v in metrics.items()}}
        if tc.eval_every and step % tc.eval_every == 0:
          record["val_bpb"], _ = evaluate_bpb(graphdef, state.params, corpus.validation_tokens, frozen=state.frozen, seq_len=tc.seq_len,
                                              batch_size=tc.batch_size, max_batches=tc.eval_batches, eval_fn=eval_fn)
        metrics_file.write(record)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", bpb=f"{float(metrics['bpb']):.3f}", bytes_s=f"{rate:,.0f}")
      bar.update(1)
      if tc.checkpoint_every and step % tc.checkpoint_every == 0:
        checkpointer.save(step, state, meta=meta, data_iterator=iterator)
      if stop.raised:
        stopped_by = stop.raised
        break
      if tc.max_seconds is not None and time.perf_counter() - started >= tc.max_seconds:
        stopped_by = "max_seconds"
        break
  bar.close()
  if checkpointer.latest_step() != step:
    checkpointer.save(step, state, meta=meta, data_iterator=iterator, force=True)
  checkpointer.close()
  metrics_file.close()
  if stopped_by in ("SIGTERM", "SIGINT"):
    _log(f"{stopped_by}: saved step {step} to {checkpointer.directory}; rerun with the same --out to resume")

  val_bpb, val_count = evaluate_bpb(graphdef, state.params, corpus.validation_tokens, frozen=state.frozen, seq_len=tc.seq_len,
                                    batch_size=tc.batch_size, max_batches=tc.eval_batches, eval_fn=eval_fn)
  summary = {
      "model": model_name, "preset": preset, "params": num_params, "steps": step,
      "train_bytes": step * bytes_per_step, "bytes_per_s": round(rate, 1), "val_bpb": round(val_bpb, 4),
      "val_bytes": val_count, "checkpoint": checkpointer.directory, "stopped_by": stopped_by,
      "final_loss": float(metrics["loss"]) if trained_steps else None,
  }
  return TrainResult(state.model(graphdef), graphdef, state, summary)


def _check_same_run(out_dir, meta):
  from bytescale.train.checkpoint import read_meta

  saved = read_meta(out_dir)
  for key in ("model", "model_config"):
    if saved.get(key) != meta[key]:
      raise configs.ConfigError(
          f"--out {out_dir}: holds a run with a different {key}; use a new --out directory to start a new run"
      )


def _log(message: str):
  print(message, file=sys.stderr, flush=True)
