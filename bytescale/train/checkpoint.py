"""Orbax checkpoints: train state, data-iterator state and the run's configs, saved together.

Layout of ``<out>/checkpoints/<step>/``: ``state`` (parameters, optimizer state, step), ``data`` (the grain
iterator, so a resumed run sees exactly the batches an uninterrupted one would), ``meta`` (JSON configs, so
``eval``/``generate`` rebuild the model from the directory alone). Orbax writes into a temporary directory and
renames it when complete, so a run killed mid-save never damages a checkpoint already on disk.

:func:`load_params` reads the parameters alone (for ``TrainConfig.init_from`` warm starts), checked by shape
against the new model first.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from bytescale import configs


def _abstract(tree):
  """Shape/dtype/sharding of every leaf: restoring onto this reshards onto the target's devices.

  Leaves that are already ``jax.ShapeDtypeStruct``s (e.g. ``ShardedTraining.abstract_state``, carrying a
  mesh's shardings) are kept, so a checkpoint saved on one mesh restores straight onto another.
  """
  keep = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)  # noqa: E731
  return jax.tree.map(keep, tree)


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 0):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(save_every, 1), create=True, enable_async_checkpointing=False,
    )
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, meta: dict, data_iterator=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, state_like, *, data_iterator=None, step: int | None = None):
    """Restores into the structure (and shardings) of ``state_like``, concrete or abstract (then nothing is
    allocated before the restore); the data iterator is updated in place."""
    step = self.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
    data_state = None
    if data_iterator is not None:
      data_state = _data_state_for_other_process_layout(os.path.join(self.directory, str(step), "data"))
      if data_state is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_state is not None:
      data_iterator.set_state(data_state)
    return restored["state"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _data_state_for_other_process_layout(data_dir: str) -> dict | None:
  """The iterator state saved by a run with a different number of processes, or None if this layout saved one.

  grain writes one ``process_<i>-of-<n>.json`` per process. Every process of a bytescale run walks the same
  sequence of global batches (it only packs its own rows of each), so all files hold the same position and any
  of them resumes a run with another process count (the rows a process packs follow from the new mesh).
  """
  own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
  if os.path.exists(own) or not os.path.isdir(data_dir):
    return None
  states = []
  for name in sorted(os.listdir(data_dir)):
    if name.startswith("process_") and name.endswith(".json"):
      with open(os.path.join(data_dir, name)) as f:
        states.append(json.load(f))
  if not states:
    return None
  if any(state != states[0] for state in states):
    raise ValueError(f"{data_dir}: the processes saved different data-iterator states; resume with the same "
                     f"number of processes ({len(states)})")
  return states[0]


def read_meta(directory: str, step: int | None = None) -> dict:
  """The JSON ``meta`` item of a checkpoint directory (``<out>`` or ``<out>/checkpoints``)."""
  directory = checkpoint_root(directory)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {directory}")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return dict(meta, step=step)


def checkpoint_root(directory: str) -> str:
  directory = os.path.abspath(directory)
  sub = os.path.join(directory, "checkpoints")
  return sub if os.path.isdir(sub) else directory


def latest_step(root: str) -> int | None:
  """The newest complete checkpoint's step under ``root`` (a ``checkpoints/`` folder); None if none, creating
  nothing."""
  if not os.path.isdir(root):
    return None
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  manager.close()
  return step


def resolve_checkpoint(directory: str) -> tuple[str, int]:
  """``(checkpoint root, step)`` for a run directory, its ``checkpoints/`` folder (latest step) or one step's
  folder in it (``<out>/checkpoints/12``). Raises FileNotFoundError if there is no checkpoint there."""
  directory = os.path.abspath(directory)
  name, parent = os.path.basename(directory), os.path.dirname(directory)
  if name.isdigit() and os.path.isdir(os.path.join(directory, "state")):
    return parent, int(name)
  root = checkpoint_root(directory)
  step = latest_step(root)
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {directory}")
  return root, step


def _param_name(path) -> str:
  """``embed.table_VxD`` for a tree path (``nnx.Variable``'s own ``value`` attribute left out)."""
  names = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
  return ".".join(names[:-1] if names and names[-1] == "value" else names)


def saved_param_shapes(root: str, step: int) -> dict[str, tuple[int, ...]]:
  """Shape of every trained parameter in a checkpoint, by name, read from its metadata (no array is loaded)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.join(root, str(step), "state")))
  tree = getattr(metadata, "tree", metadata)
  return {_param_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def check_params_match(saved: dict[str, tuple[int, ...]], params_like, source: str):
  """Raises ``ConfigError`` naming the first parameter whose shape (or presence) differs between the checkpoint
  and ``params_like``: only fields that leave every parameter's shape alone (rope, window, dropout, remat,
  dtype, ...) may change between the saved model config and the warm-started one."""
  target = {_param_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params_like)[0]}
  fix = "change only fields that keep parameter shapes (rope, window, max_seq_len, remat, dtype, ...)"
  for name in sorted(set(target) | set(saved)):
    if target.get(name) != saved.get(name):
      here = "missing" if name not in target else f"shape {target[name]}"
      there = "missing" if name not in saved else f"shape {saved[name]}"
      raise configs.ConfigError(
          f"TrainConfig.init_from: parameter {name} is {there} in the checkpoint {source} but {here} in this "
          f"model config; {fix}, or drop init_from")


def load_params(directory: str, params_like) -> tuple[object, dict]:
  """The trained parameters of the checkpoint at ``directory`` (see :func:`resolve_checkpoint`), restored
  straight into the structure and shardings of ``params_like`` (an abstract or concrete ``nnx.State`` of
  parameters: leaves that are ``jax.ShapeDtypeStruct``s with shardings land sharded like them). Nothing else is
  read: no optimizer state, step or data iterator. Returns ``(params, info)``, ``info = {"path", "step"}``.

  Shapes are checked against the checkpoint's metadata first, so a mismatch is a ``ConfigError`` naming the
  parameter rather than an orbax error.
  """
  root, step = resolve_checkpoint(directory)
  check_params_match(saved_param_shapes(root, step), params_like, f"{root} (step {step})")
  abstract = {"params": _abstract(params_like)}
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True,
  )))
  manager.close()
  return restored["state"]["params"], {"path": root, "step": step}


def load_model(directory: str, step: int | None = None):
  """Rebuilds the model saved under ``directory`` with its trained parameters. Returns ``(model, meta)``."""
  from flax import nnx

  from bytescale.models import build_model

  meta = read_meta(directory, step)
  model_config = configs.from_dict(meta["model_config"])
  model = build_model(model_config)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  target = {"params": params, "frozen": frozen}
  root = checkpoint_root(directory)
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
  # Restore the model variables alone (optimizer state is not needed for inference), onto this process's
  # default device whatever mesh saved them: restore args carry the target shardings.
  abstract = _abstract(target)
  restored = manager.restore(
      meta["step"],
      args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True,
      )),
  )
  manager.close()
  return nnx.merge(graphdef, restored["state"]["params"], restored["state"]["frozen"]), meta
