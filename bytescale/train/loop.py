"""The training driver behind ``bytescale train`` and the examples.

One call trains (or resumes) a run in ``out_dir``: data -> jitted train step with donated state -> progress
bar and JSON-lines metrics -> orbax checkpoints every ``checkpoint_every`` steps and on SIGTERM/SIGINT ->
validation bits per byte. Rerunning with the same ``out_dir`` resumes from the last checkpoint, data iterator
included, so the resumed losses equal an uninterrupted run's step for step.

Training always runs over a device mesh (``bytescale.parallel``): the train state is created already sharded
(``jax.jit`` with ``out_shardings``, never whole on one device), the step is jitted with in/out shardings and
donates the old state, and each process loads only its rows of every global batch. With no ``mesh_config``
the mesh is ``data=-1``: data parallel over every device (one device: the plain single-device run). A
checkpoint restores onto whatever mesh the resumed run uses.

``TrainConfig.init_from`` warm-starts a NEW run (fine-tuning, context extension): the parameters of another run's
checkpoint replace the fresh init at step 0, with the fresh init's shardings; optimizer state, step and data order
start fresh. The model config may differ from the saved one in anything that keeps parameter shapes (rope,
window, ...). When ``out_dir`` already holds checkpoints the run resumes and ``init_from`` is ignored.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from bytescale import configs, parallel
from bytescale.data.pipeline import ByteCorpus, DataConfig, train_iterator
from bytescale.models.registry import build_model, config_from_dict, model_name_for
from bytescale.train.buckets import bucket_slots_for, sharded_buckets
from bytescale.train.checkpoint import (Checkpointer, entropy_model_for, latest_step, load_params, read_meta,
                                        resolve_checkpoint, resolve_entropy_model)
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
  mesh: object = None


@dataclasses.dataclass
class ShardedTraining:
  """Everything the loop needs to train one model on one mesh (see :func:`sharded_training`)."""

  mesh: jax.sharding.Mesh
  rules: parallel.Rules
  graphdef: object
  abstract_state: object  # ShapeDtypeStructs carrying the target shardings: restore onto this to reshard
  state_shardings: object
  init_state: object  # () -> TrainState, created sharded
  init_state_with: object  # (params) -> TrainState at step 0 with these parameters and a fresh optimizer state
  train_step: object  # (state, global batch) -> (state, metrics); donates state (BLT: patches first, bucketed)
  eval_fn: object  # (params, frozen, numpy batch every process holds) -> (nll_sum, count)
  global_batch: int

  def shard_batch(self, local_batch: dict) -> dict:
    """This process's rows (numpy) -> global arrays sharded over the batch mesh axes."""
    return parallel.shard_batch(local_batch, self.mesh, self.global_batch, self.rules)

  def data_slice(self) -> tuple[int, int]:
    """``(process_index, process_count)`` for ``train_iterator``: which rows this process loads."""
    return parallel.process_batch_slice(self.mesh, self.global_batch, self.rules)

  def warm_start_state(self, directory: str):
    """A step-0 train state whose parameters are those saved under ``directory`` (a run, its ``checkpoints/`` or
    one step's folder), restored straight onto the shardings a fresh init has here; optimizer state is initialised
    from them and every non-parameter variable (e.g. a frozen entropy model) comes from this model config.
    Returns ``(state, {"path", "step"})``; a parameter whose shape differs raises ``ConfigError`` naming it."""
    params, source = load_params(directory, self.abstract_state.params)
    return self.init_state_with(params), source


def sharded_training(model_config, train_config: configs.TrainConfig, mesh, rules: parallel.Rules = None, *,
                     loss_fn=next_byte_loss, optimizer=None) -> ShardedTraining:
  """Sharded init, train step and eval step for ``model_config`` on ``mesh``.

  Parameter and optimizer-state shardings come from the parameters' logical names through ``rules``
  (default ``parallel.LOGICAL_AXIS_RULES``); a dimension that does not divide its mesh axes raises
  ``parallel.ShardingError`` here, before anything is compiled.
  """
  tc = train_config
  rules = parallel.LOGICAL_AXIS_RULES if rules is None else rules
  optimizer = optimizer or make_optimizer(tc)
  model_config = resolve_entropy_model(model_config)
  entropy_lm = entropy_model_for(model_config)  # BLT's trained entropy model (host arrays), read once
  graphdefs = []

  def create():
    model = build_model(model_config, seed=tc.seed, entropy_lm=entropy_lm)
    graphdef, state = init_train_state(model, optimizer)
    graphdefs.append(graphdef)
    return state

  def create_with(params):
    # The fresh init's parameters and optimizer state are unused outputs here: XLA drops their computation.
    return create().replace(params=params, opt_state=optimizer.init(params))

  with jax.set_mesh(mesh), parallel.axis_rules(rules):
    shapes = jax.eval_shape(create)
    state_shardings = parallel.tree_shardings(shapes, mesh, rules)
    param_specs = parallel.tree_specs(shapes.params, mesh, rules)
    batch_shardings = {key: parallel.batch_sharding(mesh, (tc.batch_size, tc.seq_len), rules) for key in BATCH_KEYS}
  graphdef = graphdefs[0]
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                state_shardings)
  # On an Explicit mesh the model body runs under auto_axes (see parallel.explicit_loss); on Auto it is unchanged.
  mesh_loss = parallel.explicit_loss(loss_fn, param_specs) if parallel.is_explicit(mesh) else loss_fn
  replicated = NamedSharding(mesh, P())

  def in_context(fn):
    """Traces ``fn`` with ``mesh`` and ``rules`` active, so ``parallel.constrain`` inside models sees them."""
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), parallel.axis_rules(rules):
        return fn(*args)
    return wrapped

  # BLT: patches computed before the step, cut to the smallest bucket that holds them (bytescale.train.buckets).
  slots = bucket_slots_for(model_config, tc.seq_len)
  buckets = None
  if slots is not None:
    buckets, patch_shardings = sharded_buckets(graphdef, slots, mesh, rules, abstract_state=abstract_state,
                                               batch_shape=(tc.batch_size, tc.seq_len), wrap=in_context)
    batch_shardings = {**batch_shardings, "patches": patch_shardings}
  jitted_step = jax.jit(in_context(make_train_step(graphdef, optimizer, mesh_loss)),
                        in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
                        donate_argnums=0)
  eval_step = jax.jit(in_context(make_eval_step(graphdef, mesh_loss)),
                      in_shardings=(state_shardings.params, state_shardings.frozen, batch_shardings),
                      out_shardings=replicated)

  def bucketed_step(state, batch):
    batch, used = buckets(state.params, state.frozen, batch)
    state, metrics = jitted_step(state, batch)
    return state, {**metrics, **used}

  def eval_fn(params, frozen, batch):
    batch = parallel.shard_global_batch(batch, mesh, rules)
    if buckets is not None:  # evaluation runs at the buckets the training steps compiled for (exact either way)
      batch, _ = buckets(params, frozen, batch)
    return eval_step(params, frozen, batch)

  return ShardedTraining(
      mesh=mesh, rules=rules, graphdef=graphdef, abstract_state=abstract_state, state_shardings=state_shardings,
      init_state=jax.jit(in_context(create), out_shardings=state_shardings),
      init_state_with=jax.jit(in_context(create_with), in_shardings=(state_shardings.params,),
                              out_shardings=state_shardings, donate_argnums=0),
      train_step=jitted_step if buckets is None else bucketed_step,
      eval_fn=eval_fn, global_batch=tc.batch_size,
  )


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
    mesh_config: parallel.MeshConfig | None = None,
) -> TrainResult:
  tc = train_config
  model_config = resolve_entropy_model(model_config)  # BLT: the entropy model's config goes into the run's meta
  model_name = model_name_for(model_config)
  mesh_config = mesh_config or parallel.MeshConfig()
  mesh = parallel.make_mesh(mesh_config)
  lead = jax.process_index() == 0  # only the first process writes metrics and progress
  init_from = _warm_start_source(tc.init_from, out_dir, lead)  # before loading data or compiling anything
  corpus = corpus or ByteCorpus.load(data_config)
  setup = sharded_training(model_config, tc, mesh, mesh_config.resolved_rules(), loss_fn=loss_fn)
  data_index, data_count = setup.data_slice()
  os.makedirs(out_dir, exist_ok=True)
  iterator = train_iterator(corpus, data_config, process_index=data_index, process_count=data_count)
  meta = _run_meta(model_name, preset, model_config, tc, data_config)
  checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tc.keep_checkpoints,
                              save_every=tc.checkpoint_every)
  state, start_step = _initial_state(setup, checkpointer, iterator, meta, out_dir, init_from, lead)

  run = _Run(
      tc=tc, setup=setup, corpus=corpus, iterator=iterator, checkpointer=checkpointer, meta=meta, lead=lead,
      model_name=model_name, preset=preset, schedule=learning_rate_schedule(tc),
      metrics_file=JsonlWriter(os.path.join(out_dir, "metrics.jsonl")) if lead else None,
      bar=tqdm(total=tc.steps, initial=start_step, disable=not (progress and lead), file=sys.stderr,
               dynamic_ncols=True, desc=f"train {model_name}/{preset}"),
  )
  at = _Progress(step=start_step)  # where the loop stands
  started = time.perf_counter()
  with _StopFlag() as stop, jax.set_mesh(mesh):
    while at.step < tc.steps:
      batch = setup.shard_batch({k: v for k, v in next(iterator).items() if k in BATCH_KEYS})
      tick = time.perf_counter()
      state, metrics = setup.train_step(state, batch)
      metrics = jax.device_get(metrics)
      at.advance(metrics, time.perf_counter() - tick, run.bytes_per_step)
      if at.step % tc.log_every == 0 or at.step == tc.steps:
        _log_step(run, at, state)
      run.bar.update(1)
      if tc.checkpoint_every and at.step % tc.checkpoint_every == 0:
        checkpointer.save(at.step, state, meta=meta, data_iterator=iterator)
      at.stopped_by = _agreed_stop(stop.raised or (
          "max_seconds" if tc.max_seconds is not None and time.perf_counter() - started >= tc.max_seconds else None))
      if at.stopped_by:
        break
    val_bpb, val_count = _finish(run, at, state)
  return TrainResult(state.model(setup.graphdef), setup.graphdef, state, _summary(run, at, val_bpb, val_count), mesh)


@dataclasses.dataclass
class _Run:
  """What the phases of one ``train`` call share: its configs, sharded setup, data, checkpoints and outputs."""

  tc: configs.TrainConfig
  setup: ShardedTraining
  corpus: ByteCorpus
  iterator: object  # the checkpointed train data iterator
  checkpointer: Checkpointer
  meta: dict  # the run's meta, saved with every checkpoint
  lead: bool  # the first process: the one that writes metrics, progress and messages
  model_name: str
  preset: str
  schedule: object  # step -> learning rate
  metrics_file: JsonlWriter | None  # None on every process but the lead
  bar: object  # the tqdm progress bar (disabled off the lead process or without ``progress``)

  @property
  def bytes_per_step(self) -> int:
    return self.tc.batch_size * self.tc.seq_len


@dataclasses.dataclass
class _Progress:
  """Where the loop stands: the step reached, what this call trained so far, and why it stopped."""

  step: int
  trained_steps: int = 0  # steps this call ran (a resumed run counts from its restored step)
  train_seconds: float = 0.0  # their time, less the first step's (it includes compilation)
  rate: float = 0.0  # bytes per second over ``train_seconds``
  metrics: dict = dataclasses.field(default_factory=dict)  # the last step's, on the host
  stopped_by: str | None = None  # a ``_STOP_REASONS`` entry

  def advance(self, metrics: dict, elapsed: float, bytes_per_step: int):
    """Counts one more trained step that took ``elapsed`` seconds and returned ``metrics``."""
    self.metrics = metrics
    self.step += 1
    if self.trained_steps:  # the first step includes compilation
      self.train_seconds += elapsed
    self.trained_steps += 1
    self.rate = bytes_per_step * (self.trained_steps - 1) / self.train_seconds if self.train_seconds else 0.0


def _warm_start_source(init_from: str | None, out_dir: str, lead: bool) -> str | None:
  """The checked ``TrainConfig.init_from`` to warm-start from, or None: none given, or ``out_dir`` already holds
  checkpoints (the run resumes and ``init_from`` is ignored, with a message). Cheap: runs before data or compiling."""
  resume_step = latest_step(os.path.join(out_dir, "checkpoints"))
  if init_from and resume_step:
    if lead:
      _log(f"init_from {init_from} ignored: {out_dir} already holds checkpoints (step {resume_step}); resuming")
    return None
  return _check_init_from(init_from) if init_from else None


def _run_meta(model_name: str, preset: str, model_config, tc: configs.TrainConfig, data_config: DataConfig) -> dict:
  """The meta every checkpoint of the run carries; ``init_from`` is filled in by :func:`_initial_state`."""
  return {
      "model": model_name, "preset": preset,
      "model_config": configs.to_dict(model_config),
      "train_config": configs.to_dict(tc),
      "data_config": dataclasses.asdict(data_config),
      "init_from": None,  # {"path": checkpoint root, "step": step} the parameters were warm-started from
  }


def _initial_state(setup: ShardedTraining, checkpointer: Checkpointer, iterator, meta: dict, out_dir: str,
                   init_from: str | None, lead: bool):
  """``(state, start_step)``: the last checkpoint in ``out_dir`` (data iterator included) if there is one, else the
  parameters of ``init_from`` at step 0, else a fresh init. Sets ``meta["init_from"]`` to the run's provenance."""
  start_step = checkpointer.latest_step() or 0
  if start_step:
    meta["init_from"] = _check_same_run(out_dir, meta).get("init_from")  # a resumed run keeps its provenance
    # Restoring onto abstract arrays with this mesh's shardings reshards a checkpoint saved on any other mesh.
    state = checkpointer.restore(setup.abstract_state, data_iterator=iterator)
    if lead:
      _log(f"resuming {out_dir} from step {start_step}")
  elif init_from:
    state, meta["init_from"] = setup.warm_start_state(init_from)
    if lead:
      _log(f"warm start: parameters from {meta['init_from']['path']} step {meta['init_from']['step']}")
  else:
    state = setup.init_state()
  return state, start_step


def _evaluate(run: _Run, state) -> tuple[float, int]:
  """``(bits per byte, bytes)`` of ``state`` on the validation split (at most ``eval_batches`` batches)."""
  tc = run.tc
  return evaluate_bpb(run.setup.graphdef, state.params, run.corpus.validation_tokens, frozen=state.frozen,
                      seq_len=tc.seq_len, batch_size=tc.batch_size, max_batches=tc.eval_batches,
                      eval_fn=run.setup.eval_fn)


def _log_step(run: _Run, at: _Progress, state):
  """A logged step: its metrics.jsonl record (with ``val_bpb`` on eval steps) and the progress bar's postfix."""
  tc, step, metrics = run.tc, at.step, at.metrics
  record = {"step": step, "lr": float(run.schedule(step - 1)), "bytes_per_s": at.rate,
            **{k: float(v) for k, v in metrics.items()}}
  if tc.eval_every and step % tc.eval_every == 0:
    record["val_bpb"], _ = _evaluate(run, state)
  if run.metrics_file:
    run.metrics_file.write(record)
  run.bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", bpb=f"{float(metrics['bpb']):.3f}",
                      bytes_s=f"{at.rate:,.0f}")


def _finish(run: _Run, at: _Progress, state) -> tuple[float, int]:
  """Ends the loop: closes the bar, saves the last step (unless it just was), closes checkpoints and metrics, says
  how to resume after a signal, and returns the final validation ``(bits per byte, bytes)``."""
  checkpointer = run.checkpointer
  run.bar.close()
  if checkpointer.latest_step() != at.step:
    checkpointer.save(at.step, state, meta=run.meta, data_iterator=run.iterator, force=True)
  checkpointer.close()
  if run.metrics_file:
    run.metrics_file.close()
  if at.stopped_by in ("SIGTERM", "SIGINT") and run.lead:
    _log(f"{at.stopped_by}: saved step {at.step} to {checkpointer.directory}; rerun with the same --out to resume")
  return _evaluate(run, state)


def _summary(run: _Run, at: _Progress, val_bpb: float, val_count: int) -> dict:
  """The run's summary: what ``bytescale train`` prints as its one JSON line."""
  mesh = run.setup.mesh
  return {
      "model": run.model_name, "preset": run.preset,
      "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.setup.abstract_state.params)),
      "steps": at.step, "train_bytes": at.step * run.bytes_per_step, "bytes_per_s": round(at.rate, 1),
      "val_bpb": round(val_bpb, 4), "val_bytes": val_count, "checkpoint": run.checkpointer.directory,
      "stopped_by": at.stopped_by, "final_loss": float(at.metrics["loss"]) if at.trained_steps else None,
      "mesh": ",".join(f"{name}={size}" for name, size in zip(mesh.axis_names, mesh.axis_sizes)),
      "devices": mesh.size, "processes": jax.process_count(), "init_from": run.meta["init_from"],
  }


_STOP_REASONS = (None, "max_seconds", "SIGINT", "SIGTERM")


def _agreed_stop(local_reason: str | None) -> str | None:
  """Every process stops at the same step: with several processes, the strongest reason any of them has."""
  if jax.process_count() == 1:
    return local_reason
  from jax.experimental import multihost_utils

  codes = multihost_utils.process_allgather(np.int32(_STOP_REASONS.index(local_reason)))
  return _STOP_REASONS[int(np.max(codes))]


def _check_same_run(out_dir, meta) -> dict:
  """The saved run's meta, after checking it trained the same model as ``meta`` describes."""
  saved = read_meta(out_dir)
  for key, was in (("model", saved.get("model")), ("model_config", _with_new_defaults(saved.get("model_config")))):
    if was != meta[key]:
      raise configs.ConfigError(
          f"--out {out_dir}: holds a run with a different {key}; use a new --out directory to start a new run"
      )
  return saved


def _with_new_defaults(saved_config: dict | None) -> dict | None:
  """A saved model config as this version writes it: fields added since it was saved take their defaults (a run
  saved before ``PatchingConfig.patch_buckets`` existed resumes); one that no longer rebuilds stays as it was."""
  try:
    return configs.to_dict(config_from_dict(saved_config))
  except (configs.ConfigError, TypeError, KeyError, AttributeError):
    return saved_config


def _check_init_from(directory: str) -> str:
  """``directory`` if it holds a checkpoint to warm-start from, else a ConfigError saying what to pass."""
  fix = "pass a run directory written by bytescale train (or its checkpoints/ folder, or one step's folder in it)"
  configs.check(os.path.exists(directory), "TrainConfig", "init_from", f"{directory} does not exist; {fix}")
  try:
    resolve_checkpoint(directory)
  except FileNotFoundError:
    raise configs.ConfigError(f"TrainConfig.init_from: no checkpoint under {directory}; {fix}") from None
  return directory


def _log(message: str):
  print(message, file=sys.stderr, flush=True)
