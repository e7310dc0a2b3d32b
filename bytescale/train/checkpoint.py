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

import dataclasses
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from bytescale import configs
from bytescale.models import registry
from bytescale.models.blt import float32_config, freeze
from bytescale.models.bytelm import ByteLM


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
  """``embed.table`` for a tree path (``nnx.Variable``'s own ``value`` attribute left out)."""
  names = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
  return ".".join(names[:-1] if names and names[-1] == "value" else names)


def _saved_tree(root: str, step: int) -> dict:
  """The metadata tree of a checkpoint's ``state`` item (shapes and dtypes; no array is loaded)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.join(root, str(step), "state")))
  return getattr(metadata, "tree", metadata)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {_param_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_param_shapes(root: str, step: int) -> dict[str, tuple[int, ...]]:
  """Shape of every trained parameter in a checkpoint, by today's name (see :func:`upgrade_legacy_names`)."""
  return _shapes(upgrade_legacy_names(_saved_tree(root, step)["params"]))


# --- Checkpoints written before parameter names lost their shape suffixes ------------------------------------

_LEGACY_SUFFIX = re.compile(r"_[A-Z0-9]+(?:x[A-Z0-9]+)*$")
_LEGACY_RENAMES = {"unembed": "unembedding"}  # after the suffix is gone: names that became something else
_ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")


def upgrade_legacy_names(tree):
  """A checkpoint's nested variable dict with today's names. Until issue #13, parameter names carried shape
  suffixes (``wq_DxHxK``, ``table_VxD``, ``unembed_DxV``) and MegaByte's local blocks held their attention
  projections directly; today they are ``wq``, ``table``, ``unembedding`` and ``blocks.attention.wq`` as in every
  other block. A tree already in today's names comes back unchanged."""
  if not isinstance(tree, dict):
    return tree
  upgraded = {}
  for key, value in tree.items():
    name = _LEGACY_SUFFIX.sub("", key) if isinstance(key, str) else key
    upgraded[_LEGACY_RENAMES.get(name, name)] = upgrade_legacy_names(value)
  if "attention_norm" in upgraded and "attention" not in upgraded and set(_ATTENTION_PROJECTIONS) <= set(upgraded):
    upgraded["attention"] = {name: upgraded.pop(name) for name in _ATTENTION_PROJECTIONS}
  return upgraded


def restore_variables(root: str, step: int, target: dict, *, host: bool = False) -> dict:
  """The checkpoint's model variables restored into ``target``'s structure and shardings: ``target`` maps
  ``"params"`` (and optionally ``"frozen"``) to ``nnx.State``s, concrete or abstract (``jax.ShapeDtypeStruct``
  leaves with shardings land sharded like them). Nothing else is read (no optimizer state, data iterator).

  ``host``: numpy arrays instead (nothing touches a device: safe while tracing).

  A checkpoint written with the old parameter names (:func:`upgrade_legacy_names`) is read whole onto the host
  and renamed; one whose names or shapes still differ raises ``ConfigError`` naming the first such variable.
  """
  saved = {key: value for key, value in _saved_tree(root, step).items() if key in target}
  abstract = _abstract(target)
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
  try:
    if _shapes(saved) == _shapes(abstract):  # today's names: straight onto the target shardings
      restore_args = (jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract) if host
                      else ocp.checkpoint_utils.construct_restore_args(abstract))
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=True)))
      return restored["state"]
    upgraded = upgrade_legacy_names(saved)
    _check_same_variables(_shapes(upgraded), _shapes(abstract), f"{root} (step {step})")
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=saved, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  upgraded_raw = upgrade_legacy_names(raw)
  values = {_param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(upgraded_raw)[0]}
  if host:
    return jax.tree_util.tree_map_with_path(lambda path, _: values[_param_name(path)], abstract)
  place = lambda path, like: jax.device_put(values[_param_name(path)], getattr(like, "sharding", None))  # noqa: E731
  return jax.tree_util.tree_map_with_path(place, abstract)


def _check_same_variables(saved: dict, target: dict, source: str):
  for name in sorted(set(saved) | set(target)):
    if saved.get(name) != target.get(name):
      there = "missing" if name not in saved else f"shape {saved[name]}"
      here = "missing" if name not in target else f"shape {target[name]}"
      raise configs.ConfigError(f"checkpoint {source}: variable {name} is {there} there but {here} in the model "
                                "built from its config")


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
  params = restore_variables(root, step, {"params": params_like})["params"]
  return params, {"path": root, "step": step}


def load_model(directory: str, step: int | None = None):
  """Rebuilds the model saved under ``directory`` with its trained parameters. Returns ``(model, meta)``."""
  meta = read_meta(directory, step)
  model_config = registry.config_from_dict(meta["model_config"])
  model = registry.build_model(model_config)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  # The model variables alone (no optimizer state), onto this process's default device whatever mesh saved them.
  restored = restore_variables(checkpoint_root(directory), meta["step"], {"params": params, "frozen": frozen})
  return nnx.merge(graphdef, restored["params"], restored["frozen"]), meta


# --- BLT's entropy model -------------------------------------------------------------------------------------

def load_entropy_model(directory: str) -> ByteLM:
  """The ByteLM saved under ``directory``, in float32 (whatever it trained in), with ``Frozen`` weights (for
  ``BLT(..., entropy_lm=...)`` and ``bytescale.entropy``).

  Safe to call while tracing (the training loop builds models inside ``jax.eval_shape`` and ``jax.jit``): the
  model is built abstractly and the weights are restored from disk as concrete host arrays.
  """
  config = float32_config(_entropy_model_config(directory))
  graphdefs = []

  def build():  # shapes only (jax.eval_shape, not nnx.eval_shape: that would apply the logical shardings)
    graphdef, params, rest = nnx.split(ByteLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    graphdefs.append(graphdef)
    return {"params": params, "frozen": rest}

  target = jax.eval_shape(build)
  restored = restore_variables(*resolve_checkpoint(directory), target, host=True)
  # Parameters are stored in float32 whatever the compute dtype, so the float32 model takes them as they are.
  as_float32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)  # noqa: E731
  return freeze(nnx.merge(graphdefs[0], as_float32(restored["params"]), as_float32(restored["frozen"])))


def _entropy_model_config(directory: str) -> configs.ByteLMConfig:
  try:
    meta = read_meta(directory)
  except (FileNotFoundError, ValueError) as error:
    raise configs.ConfigError(f"BLTConfig.entropy_model: no checkpoint under {directory} ({error}); train one with "
                              "`bytescale train --model bytelm --preset entropy-tiny --out DIR`") from None
  if meta.get("model") != "bytelm":
    raise configs.ConfigError(
        f"BLTConfig.entropy_model: {directory} holds a {meta.get('model')!r} model; the entropy model must be a "
        "bytelm checkpoint (bytescale train --model bytelm --preset entropy-tiny)")
  return registry.config_from_dict(meta["model_config"])


def _entropy_model_owners(config, path=()):
  """Paths of the (nested) configs in ``config`` that name an entropy model (BLT's, also as a trunk)."""
  if not dataclasses.is_dataclass(config):
    return
  names = {field.name for field in dataclasses.fields(config)}
  if {"entropy_model", "entropy_model_config"} <= names:
    yield path
  for name in names:
    yield from _entropy_model_owners(getattr(config, name), path + (name,))


def resolve_entropy_model(config):
  """``config`` with the entropy model of every BLT in it (``entropy_model=DIR``) made absolute and its
  ``entropy_model_config`` read from ``DIR``. A directory that no longer exists is fine when the config is already
  known (a saved run rebuilds without it); otherwise a ``ConfigError`` says how to make one."""
  for path in _entropy_model_owners(config):
    owner = config
    for name in path:
      owner = getattr(owner, name)
    if owner.entropy_model is None:
      continue
    directory = os.path.abspath(os.path.expanduser(owner.entropy_model))
    if os.path.isdir(directory):
      updated = dataclasses.replace(owner, entropy_model=directory,
                                    entropy_model_config=_entropy_model_config(directory))
    elif owner.entropy_model_config is not None:
      updated = dataclasses.replace(owner, entropy_model=directory)
    else:
      raise configs.ConfigError(
          f"{type(owner).__name__}.entropy_model: {directory} does not exist; train an entropy model with "
          "`bytescale train --model bytelm --preset entropy-tiny --out DIR` and pass its DIR")
    config = configs.replace_paths(config, [(".".join(path), updated)]) if path else updated
  return config


def entropy_model_for(config):
  """The trained entropy model ``config`` (resolved) patches with, or None: loaded from its directory when
  ``config`` (or its trunk) is a BLT with entropy patching whose directory exists."""
  for path in _entropy_model_owners(config):
    owner = config
    for name in path:
      owner = getattr(owner, name)
    if owner.patching.needs_entropies and owner.entropy_model and os.path.isdir(owner.entropy_model):
      return load_entropy_model(owner.entropy_model)
  return None
