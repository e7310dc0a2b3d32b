"""Meshes, the one logical-axis rules table, and sharding of train states, batches and activations.

Model code never names mesh axes. Every parameter carries logical axis names (``bytescale.nn.layers.param``
stores them as ``out_sharding`` metadata on the ``nnx.Param``), key activations are tagged with
:func:`constrain`, and this module alone maps logical names to mesh axes with :data:`LOGICAL_AXIS_RULES`.

Mesh axes, outermost first (the outer axes may cross hosts or slices, the inner ones should stay on fast links):

* ``data``: pure data parallelism (parameters replicated, batch split);
* ``fsdp``: fully sharded data parallelism (batch split, parameters *and* optimizer state sharded on ``embed``);
* ``tensor``: tensor (model) parallelism over attention heads and the MLP hidden width.

A mesh is written ``data=2,fsdp=2,tensor=2`` (:func:`parse_mesh`; one size may be ``-1``: the rest of the
devices). Axes left out have size 1. ``axis_types`` is ``auto`` (GSPMD propagates shardings through the model)
or ``explicit`` (the train state and batches carry their shardings in their types and every reshard in the step
is explicit; the model body runs under ``jax.sharding.auto_axes``, see :func:`explicit_loss`).

Resolving a tuple of logical names follows Flax Linen's convention: rules are tried in table order and a rule
is taken only if none of its mesh axes is already used by an earlier dimension of the same array; mesh axes of
size 1 are dropped. So an activation ``("batch", "sequence", "embed")`` puts ``batch`` on ``(data, fsdp)`` and
leaves ``embed`` unsharded, while a parameter ``("embed", "mlp")`` puts ``embed`` on ``fsdp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bytescale.configs import ConfigError, check

MESH_AXES = ("data", "fsdp", "tensor")
AXIS_TYPES = ("auto", "explicit")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# THE table: logical axis name -> mesh axes. A name may appear more than once (tried in order, see above).
LOGICAL_AXIS_RULES: Rules = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("sequence", None),
    ("patches", None),
    # Parameters (and activations that share their names).
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("hash_buckets", "tensor"),
    ("cross_queries", None),  # BLT's few query slots per patch
    # The byte vocabulary (260 ids) is too small to be worth splitting, and 260 divides few axis sizes.
    ("vocab", None),
    ("norm", None),
    ("layers", None),
)


class ShardingError(ConfigError):
  """A mesh or a sharding cannot be built; the message names the numbers that disagree and the fix."""


# --- Mesh ---------------------------------------------------------------------------------------------------

def parse_mesh(spec: str) -> dict[str, int]:
  """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}`` (sizes may include one ``-1``)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    match = re.fullmatch(r"([a-z_]+)\s*=\s*(-?\d+)", part)
    if not match:
      raise ShardingError(f"--mesh {spec!r}: cannot parse {part!r}; write AXIS=SIZE pairs like data=2,fsdp=2,tensor=2")
    name, size = match.group(1), int(match.group(2))
    if name not in MESH_AXES:
      raise ShardingError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
    if name in sizes:
      raise ShardingError(f"--mesh {spec!r}: axis {name!r} is given twice")
    if size == 0 or size < -1:
      raise ShardingError(f"--mesh {spec!r}: axis {name} has size {size}; use a positive size or -1 (the rest)")
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise ShardingError(f"--mesh {spec!r}: at most one axis may be -1")
  return sizes


def parse_rules(assignments: Sequence[str]) -> Rules:
  """``["kv_heads=none", "batch=data+fsdp"]`` -> rule overrides for :class:`MeshConfig`."""
  rules = []
  for assignment in assignments:
    name, sep, value = assignment.partition("=")
    if not sep or not name.strip():
      raise ShardingError(f"--mesh-rule {assignment!r}: write LOGICAL=AXES, e.g. kv_heads=none or batch=data+fsdp")
    axes = tuple(a.strip() for a in value.split("+") if a.strip())
    if value.strip().lower() in ("", "none", "null"):
      axes = ()
    for axis in axes:
      if axis not in MESH_AXES:
        raise ShardingError(f"--mesh-rule {assignment!r}: unknown mesh axis {axis!r}; use {', '.join(MESH_AXES)}")
    rules.append((name.strip(), None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape, axis types and rule overrides. ``shape`` pairs axis names with sizes (one may be -1).

  ``rules`` replace the :data:`LOGICAL_AXIS_RULES` entries of the logical names they mention.
  """

  shape: tuple[tuple[str, int], ...] = (("data", -1),)
  axis_types: str = "auto"
  rules: Rules = ()

  def __post_init__(self):
    names = [name for name, _ in self.shape]
    check(all(n in MESH_AXES for n in names), "MeshConfig", "shape", f"axes must be among {MESH_AXES}, got {names}")
    check(len(set(names)) == len(names), "MeshConfig", "shape", f"each axis at most once, got {names}")
    sizes = [size for _, size in self.shape]
    check(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1, "MeshConfig", "shape",
          f"sizes must be positive with at most one -1, got {sizes}")
    check(self.axis_types in AXIS_TYPES, "MeshConfig", "axis_types",
          f"must be one of {AXIS_TYPES}, got {self.axis_types!r}")

  @classmethod
  def parse(cls, spec: str, *, axis_types: str = "auto", rules: Sequence[str] = ()) -> MeshConfig:
    return cls(shape=tuple(parse_mesh(spec).items()), axis_types=axis_types, rules=parse_rules(rules))

  def describe(self) -> str:
    return ",".join(f"{name}={size}" for name, size in self.shape)

  def resolved_rules(self) -> Rules:
    return override_rules(LOGICAL_AXIS_RULES, self.rules)


def override_rules(base: Rules, overrides: Rules) -> Rules:
  """``base`` with every entry of a logical name that ``overrides`` mentions replaced by the override."""
  overridden = {name for name, _ in overrides}
  return tuple(overrides) + tuple(rule for rule in base if rule[0] not in overridden)


def mesh_axis_sizes(config: MeshConfig, num_devices: int) -> dict[str, int]:
  """Sizes of all of :data:`MESH_AXES` (absent ones are 1, ``-1`` takes the remaining devices)."""
  sizes = dict(config.shape)
  known = math.prod(s for s in sizes.values() if s != -1)
  described = config.describe()
  if num_devices % known:
    raise ShardingError(f"--mesh {described}: its {known} devices do not divide the {num_devices} devices "
                        f"available; use axis sizes whose product divides {num_devices}")
  for name, size in sizes.items():
    if size == -1:
      sizes[name] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ShardingError(f"--mesh {described}: uses {total} of the {num_devices} devices available; make the sizes "
                        f"multiply to {num_devices} (or give one axis size -1)")
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(config: MeshConfig | str | None = None, *, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh over ``devices`` (default: every device of every process) with all of :data:`MESH_AXES`."""
  if config is None:
    config = MeshConfig()
  elif isinstance(config, str):
    config = MeshConfig.parse(config)
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_axis_sizes(config, len(devices))
  axis_type = AxisType.Explicit if config.axis_types == "explicit" else AxisType.Auto
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(axis_type,) * len(sizes), devices=devices)


def is_explicit(mesh) -> bool:
  return bool(mesh.axis_names) and all(t == AxisType.Explicit for t in mesh.axis_types)


# --- Logical names -> partition specs ---------------------------------------------------------------------------

_context = threading.local()


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[Rules]:
  """Makes ``rules`` the table :func:`constrain` uses (inside a mesh context) for the enclosed code."""
  previous = getattr(_context, "rules", None)
  _context.rules = rules
  try:
    yield rules
  finally:
    _context.rules = previous


def current_rules() -> Rules:
  return getattr(_context, "rules", None) or LOGICAL_AXIS_RULES


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], mesh_sizes: Mapping[str, int], rules: Rules | None = None, *,
                    shape: Sequence[int] | None = None, what: str = "array", strict: bool = True) -> P:
  """The ``PartitionSpec`` for an array whose dimensions have logical ``names`` on a mesh of ``mesh_sizes``.

  With ``shape``, each sharded dimension must be divisible by the product of its mesh axes: otherwise a
  :class:`ShardingError` names the dimension, both numbers and the fix (before JAX would fail less clearly);
  with ``strict=False`` such a dimension is left unsharded instead (activation hints).
  """
  rules = current_rules() if rules is None else rules
  known = {name for name, _ in rules}
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in known:
      raise ShardingError(f"{what}: logical axis {name!r} has no rule; add it to parallel.LOGICAL_AXIS_RULES "
                          f"(known: {sorted(known)})")
    chosen: tuple[str, ...] = ()
    for rule_name, axes in rules:
      if rule_name != name:
        continue
      candidate = tuple(a for a in _as_tuple(axes) if mesh_sizes.get(a, 1) > 1)
      if not used.intersection(candidate):
        chosen = candidate
        break
    if shape is not None and chosen:
      parts = math.prod(mesh_sizes[a] for a in chosen)
      if shape[dim] % parts and not strict:
        chosen = ()
      elif shape[dim] % parts:
        axes_text = "*".join(f"{a}={mesh_sizes[a]}" for a in chosen)
        raise ShardingError(
            f"{what}: dimension {dim} ({name!r}) has size {shape[dim]}, not divisible by mesh axes {axes_text} "
            f"({parts} shards); choose a size divisible by {parts}, a different --mesh, or "
            f"--mesh-rule {name}=none to replicate it")
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _mesh_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_sharding(names: Sequence[str | None], mesh, rules: Rules | None = None, *,
                     shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, _mesh_sizes(mesh), rules, shape=shape, what=what))


def _path_text(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_names_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical names an ``nnx.Variable`` was created with (``out_sharding`` metadata), or None."""
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def tree_specs(tree, mesh, rules: Rules | None = None):
  """``PartitionSpec``s for every array of ``tree`` (a train state, a model state, optimizer state...).

  Arrays inside an ``nnx.Variable`` with logical names get the spec those names imply; every other array
  (step counters, Adam's ``count``, scalars) is replicated. The result has the structure of ``tree``.
  """
  sizes = _mesh_sizes(mesh)

  def spec_for(path, x):
    if isinstance(x, nnx.Variable):
      names = logical_names_of(x)
      value = x.get_value()
      if names is None or not hasattr(value, "shape"):
        return x.replace(P())
      if len(names) != len(value.shape):
        raise ShardingError(f"{_path_text(path)}: logical names {names} do not match shape {value.shape}")
      return x.replace(logical_to_spec(names, sizes, rules, shape=value.shape, what=_path_text(path)))
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(tree, mesh, rules: Rules | None = None):
  """:func:`tree_specs` as ``NamedSharding``s on ``mesh`` (for ``jax.jit`` in/out shardings and restores)."""
  specs = tree_specs(tree, mesh, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


# --- Batches --------------------------------------------------------------------------------------------------

BATCH_NAMES = ("batch", "sequence")


def batch_sharding(mesh, global_shape: Sequence[int], rules: Rules | None = None) -> NamedSharding:
  """Rows over the ``batch`` mesh axes (``data`` and ``fsdp``), checked for divisibility."""
  names = BATCH_NAMES[:len(global_shape)] + (None,) * max(len(global_shape) - 2, 0)
  return logical_sharding(names, mesh, rules, shape=global_shape, what=f"batch of shape {tuple(global_shape)}")


def process_batch_slice(mesh, global_batch: int, rules: Rules | None = None) -> tuple[int, int]:
  """``(index, count)``: this process loads rows ``[index*B/count, (index+1)*B/count)`` of each global batch.

  Processes whose devices hold the same rows (the batch is replicated over the mesh axes that span them) get
  the same index. Pass the result to ``train_iterator(..., process_index=, process_count=)``.
  """
  sharding = batch_sharding(mesh, (global_batch, 1), rules)
  rows = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                 for idx in sharding.addressable_devices_indices_map((global_batch, 1)).values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start or global_batch % (stop - start):
    raise ShardingError(f"the devices of process {jax.process_index()} hold rows {rows} of the batch, not one "
                        f"contiguous equal share; order the mesh so batch axes (data, fsdp) come first")
  return start // (stop - start), global_batch // (stop - start)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh, global_batch: int, rules: Rules | None = None,
                ) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (as :func:`process_batch_slice` assigned them)."""
  out = {}
  for key, local in local_batch.items():
    global_shape = (global_batch, *local.shape[1:])
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape, rules), local, global_shape)
  return out


def shard_global_batch(batch: Mapping[str, np.ndarray], mesh, rules: Rules | None = None) -> dict[str, jax.Array]:
  """Global arrays from a batch every process holds in full (evaluation)."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, value.shape, rules)
    out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, value=value: value[index])
  return out


# --- Activations ----------------------------------------------------------------------------------------------

def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins activation ``x`` to the sharding its logical ``names`` imply; a no-op outside a mesh context.

  Inside ``jax.set_mesh`` (or ``jax.sharding.use_abstract_mesh``) with Auto axes this is a
  ``with_sharding_constraint``; with Explicit axes it is an explicit ``reshard``. Rules come from
  :func:`axis_rules` (default :data:`LOGICAL_AXIS_RULES`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return x
  # Lenient: an activation whose dimension does not divide (a batch of 1 while sampling) stays unconstrained.
  spec = logical_to_spec(names, _mesh_sizes(mesh), shape=x.shape, strict=False)
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  auto = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto]
  # Only Auto axes can be constrained; Explicit ones are already in the type and Manual ones are per-shard.
  spec = P(*(_keep_axes(entry, auto) for entry in spec))
  return jax.lax.with_sharding_constraint(x, spec)


def _keep_axes(entry, allowed):
  kept = tuple(a for a in _as_tuple(entry) if a in allowed)
  return None if not kept else kept[0] if len(kept) == 1 else kept


# --- Explicit meshes ----------------------------------------------------------------------------------------

def explicit_loss(loss_fn, param_specs=None):
  """Wraps ``loss_fn(model, batch) -> (loss, aux)`` so it runs on an Explicit mesh.

  The train state and batch stay explicitly sharded (their shardings are part of their types, and the
  optimizer update is typed end to end), while the model body runs under ``jax.sharding.auto_axes``: model
  code is written once for every layout and does not spell out the output sharding of each contraction.
  Parameters are re-pinned to their logical shardings inside the auto region (``param_specs``, from
  :func:`tree_specs`), so the compiler keeps them sharded (FSDP) instead of gathering them whole.
  """

  def wrapped(model, batch):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not is_explicit(mesh):
      return loss_fn(model, batch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def body(params, rest, batch):
      if param_specs is not None:
        params = jax.tree.map(lambda x, spec: jax.lax.with_sharding_constraint(x, spec), params, param_specs)
      return loss_fn(nnx.merge(graphdef, params, rest), batch)

    auto_mesh = mesh.update_axis_types({name: AxisType.Auto for name in mesh.axis_names})
    with jax.sharding.use_abstract_mesh(auto_mesh):
      unsharded = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, rest, batch))
      out_shape = jax.eval_shape(lambda p, r, b: loss_fn(nnx.merge(graphdef, p, r), b), *unsharded)
    replicated = jax.tree.map(lambda _: P(), out_shape)
    return jax.sharding.auto_axes(body, out_sharding=replicated)(params, rest, batch)

  return wrapped


# --- Multi-host -------------------------------------------------------------------------------------------------

def initialize_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> bool:
  """Calls ``jax.distributed.initialize`` (before anything touches devices). Returns whether it did.

  With ``coordinator``/``num_processes``/``process_id`` given (a GPU cluster, or several processes on one
  machine), they are passed on; with ``auto`` alone JAX detects the cluster (TPU pods, SLURM, Open MPI,
  Kubernetes; or the ``JAX_COORDINATOR_ADDRESS`` environment variable). With neither it does nothing.
  """
  explicit = (coordinator, num_processes, process_id)
  if all(v is None for v in explicit) and not auto:
    return False
  if not auto and any(v is None for v in explicit):
    raise ShardingError("--coordinator, --num-processes and --process-id go together (or use --distributed to "
                        "let JAX detect the cluster)")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ShardingError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def replicate(tree, mesh):
  """Every array of ``tree`` whole on every device of ``mesh`` (e.g. to sample from a sharded model)."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(lambda t: t, out_shardings=jax.tree.map(lambda _: replicated, tree))(tree)
