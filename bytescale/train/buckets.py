"""Bucketed patch slots: BLT's global model runs over the patches a batch has, not over every ``max_patches`` slot.

Inside a train step BLT patches its rows at the static ``max_patches = ceil(max_patches_ratio * T)`` slots (512 per
1,024 bytes at the presets' 0.5) while space or entropy patching fills about half of them, so the global model
would mostly run on empty slots. Patches need no gradient, so :class:`PatchBuckets` computes them BEFORE the step,
at the full size (overflow policy unchanged), reads the largest per-row patch count on the host, cuts the
``Patches`` to the smallest slot count of ``PatchingConfig.bucket_slots`` that holds it (only empty slots go: the
loss and gradients are those of the full size) and hands them to the step as ``batch["patches"]``. ``jax.jit``
compiles the step once per slot count it meets, so the buckets are a short static list.

The model protocol is untouched: the step calls ``model(bytes, segment_ids, patches=...)`` (``BLT.loss`` reads
``batch["patches"]``). Other models (and a BLT with ``patch_buckets=()``) are not bucketed: :func:`bucket_slots_for`
returns None and the step patches inside as before.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bytescale import parallel
from bytescale.models.blt import BLTConfig
from bytescale.patching import Patches


def bucket_slots_for(model_config, seq_len: int) -> tuple[int, ...] | None:
  """The slot counts a BLT trained on rows of ``seq_len`` bytes may run at (ascending, the full size last), or None
  when there is nothing to choose: not a BLT, ``patch_buckets=()``, or no bucket below the full size."""
  if not isinstance(model_config, BLTConfig):
    return None
  slots = model_config.patching.bucket_slots(seq_len)
  return slots if len(slots) > 1 else None


def choose_slots(count: int, slots: Sequence[int]) -> int:
  """The smallest of ``slots`` (ascending) holding ``count`` patches; the largest (the full size) when none does."""
  return next((s for s in slots if s >= count), slots[-1])


def full_patches_fn(graphdef) -> Callable:
  """``(params, frozen, inputs, segment_ids) -> (Patches at the full max_patches, largest per-row patch count)``:
  the patches ``BLT.forward`` would compute inside the step (entropies from the frozen entropy model, or space /
  strided rules), as a pure function to jit."""

  def patches(params, frozen, inputs_BxT, segment_ids_BxT):
    model = nnx.merge(graphdef, params, frozen)
    full = model.patch(inputs_BxT, segment_ids_BxT)
    return full, jnp.max(full.num_patches_B).astype(jnp.int32)

  return patches


class PatchBuckets:
  """Adds ``batch["patches"]`` cut to the smallest bucket holding every row's patches (see the module docstring).

  ``patch_fn`` is :func:`full_patches_fn` jitted (with the shardings the caller needs) and ``truncate_fn``
  ``(Patches, slots) -> Patches`` jitted with ``slots`` static; :meth:`plain` builds both unsharded.
  """

  def __init__(self, slots: Sequence[int], patch_fn: Callable, truncate_fn: Callable):
    self.slots = tuple(slots)
    self.patch_fn = patch_fn
    self.truncate_fn = truncate_fn

  @classmethod
  def plain(cls, graphdef, slots: Sequence[int]) -> PatchBuckets:
    return cls(slots, jax.jit(full_patches_fn(graphdef)), jax.jit(truncate, static_argnums=1))

  def __call__(self, params, frozen, batch: dict) -> tuple[dict, dict]:
    """``(batch with "patches", {"patch_slots": slots used, "max_row_patches": the count that chose them})``."""
    full, count = self.patch_fn(params, frozen, batch["inputs"], batch["segment_ids"])
    count = int(count)  # the one host read per step: the shapes of the step depend on it
    slots = choose_slots(count, self.slots)
    patches = full if slots == full.max_patches else self.truncate_fn(full, slots)
    return {**batch, "patches": patches}, {"patch_slots": slots, "max_row_patches": count}


def truncate(patches, slots: int):
  return patches.truncated(slots)


def sharded_buckets(graphdef, slots: Sequence[int], mesh, rules, *, abstract_state, batch_shape: tuple[int, int],
                    wrap: Callable = lambda fn: fn) -> tuple[PatchBuckets, Patches]:
  """``(PatchBuckets, Patches of NamedShardings)`` for a train state on ``mesh`` (``abstract_state``: shapes carrying
  their shardings) and batches of ``batch_shape``: the patches are split over rows like the batch (the slot axis is
  never split, so every bucket shares these shardings), the patch count is replicated. ``wrap`` puts the mesh and
  rules in context while tracing. On an Explicit mesh the patcher runs under ``auto_axes``, as the loss does
  (``parallel.explicit_loss``)."""
  body = full_patches_fn(graphdef)
  unsharded = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
  tokens = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  shapes, _ = jax.eval_shape(body, unsharded(abstract_state.params), unsharded(abstract_state.frozen), tokens, tokens)
  patch_shardings = jax.tree.map(
      lambda a: parallel.logical_sharding(("batch",) + (None,) * (a.ndim - 1), mesh, rules, shape=a.shape,
                                          what=f"patches of shape {a.shape}"), shapes)
  if parallel.is_explicit(mesh):
    specs = (jax.tree.map(lambda s: s.spec, patch_shardings), P())
    mesh_body = lambda *args: jax.sharding.auto_axes(body, out_sharding=specs)(*args)  # noqa: E731
  else:
    mesh_body = body
  shardings_of = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
  token_sharding = parallel.batch_sharding(mesh, batch_shape, rules)
  patch_fn = jax.jit(wrap(mesh_body), out_shardings=(patch_shardings, NamedSharding(mesh, P())),
                     in_shardings=(shardings_of(abstract_state.params), shardings_of(abstract_state.frozen),
                                   token_sharding, token_sharding))
  truncate_fn = jax.jit(truncate, static_argnums=1, out_shardings=patch_shardings)
  return PatchBuckets(slots, patch_fn, truncate_fn), patch_shardings
