"""Measurements on a simulated 8-device CPU mesh, run as a subprocess by tests/test_parallel.py.

Not a test module (pytest does not collect it): the 8 devices must exist before jax is imported, and the rest of
the suite keeps one device. It trains every (model, layout) case and an independent single-device reference,
then writes what it saw to ``<out>/results.json`` (losses, shardings, shard shapes) and ``<out>/arrays.npz``
(parameters); test_parallel.py makes every assertion.

  python tests/multidevice_worker.py OUT_DIR --case bytelm/dp/auto --case ... [--sharded-init CASE]
      [--checkpoint-from CASE --checkpoint-to CASE]

A case is MODEL/LAYOUT/AXIS_TYPES with LAYOUT one of sharding_cases.LAYOUTS. ``--sharded-init`` also trains that
case from ``init_state()`` (created sharded under jit) instead of the reference's initial values placed on the mesh;
``--checkpoint-from/-to`` saves the first case's final state and restores it onto the second case's mesh.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from bytescale import parallel  # noqa: E402
from bytescale.configs import TrainConfig  # noqa: E402
from bytescale.models import build_model  # noqa: E402
from bytescale.train.checkpoint import Checkpointer  # noqa: E402
from bytescale.train.loop import sharded_training  # noqa: E402
from bytescale.train.state import init_train_state, make_optimizer  # noqa: E402
from bytescale.train.step import make_train_step  # noqa: E402
from sharding_cases import LAYOUTS, model_config  # noqa: E402

BATCH, SEQ, STEPS = 8, 32, 3


def make_batches(seed: int = 0):
  """Packed rows: several documents per row (segment ids 1, 2, ...) and a padded tail (segment 0, no loss)."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(STEPS + 1):
    tokens = rng.integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
    starts = rng.random((BATCH, SEQ)) < 0.08
    segment_ids = (1 + np.cumsum(starts, axis=1)).astype(np.int32)
    lengths = rng.integers(SEQ // 2, SEQ + 1, BATCH)
    segment_ids[np.arange(SEQ)[None, :] >= lengths[:, None]] = 0
    batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
                    "loss_mask": (segment_ids > 0).astype(np.float32)})
  return batches


def flat_params(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def reference_run(config, train_config, batches):
  """One device, no mesh, no shardings: the plain jitted step the issue compares against. ``STEPS + 1`` steps
  (the last one checks the run continued after a checkpoint moved to another mesh)."""
  optimizer = make_optimizer(train_config)
  graphdef, state = init_train_state(build_model(config, seed=train_config.seed), optimizer)
  initial = state
  step = jax.jit(make_train_step(graphdef, optimizer))
  losses, after_steps = [], None
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    if i + 1 == STEPS:
      after_steps = flat_params(state.params)
  return losses, initial, after_steps


def sharding_facts(tree, mesh) -> list[dict]:
  """For every array inside an nnx.Variable: its logical names, spec, global and per-device shapes."""
  facts = []
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, leaf in leaves:
    if not isinstance(leaf, nnx.Variable):
      continue
    array = leaf.get_value()
    spec = array.sharding.spec
    facts.append({
        "path": jax.tree_util.keystr(path),
        "names": list(parallel.logical_names_of(leaf) or ()),
        "spec": [list(parallel._as_tuple(entry)) for entry in spec] + [[]] * (array.ndim - len(spec)),
        "shape": list(array.shape),
        "shard_shape": list(array.addressable_shards[0].data.shape),
        "mesh_matches": array.sharding.mesh.shape_tuple == mesh.shape_tuple,
    })
  return facts


def sharded_run(config, train_config, batches, layout: str, axis_types: str, initial_state, sharded_init: bool):
  mesh_config = parallel.MeshConfig.parse(LAYOUTS[layout], axis_types=axis_types)
  mesh = parallel.make_mesh(mesh_config)
  setup = sharded_training(config, train_config, mesh, mesh_config.resolved_rules())
  losses, extra = [], {}
  with jax.set_mesh(mesh):
    if sharded_init:
      state = setup.init_state()
      extra["initial"] = flat_params(state.params)
    else:  # the same initial values as the reference, placed with this layout's shardings
      state = jax.device_put(jax.tree.map(np.asarray, initial_state), setup.state_shardings)  # from the host
    for batch in batches[:STEPS]:
      state, metrics = setup.train_step(state, setup.shard_batch(batch))
      losses.append(float(metrics["loss"]))
  facts = {"losses": losses, "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
           "explicit": parallel.is_explicit(mesh), **state_facts(state, mesh)}
  return setup, state, facts, extra


def state_facts(state, mesh):
  adam = state.opt_state[1][0]  # chain(clip, adamw); adamw = chain(scale_by_adam, ...) -> ScaleByAdamState
  return {"params": sharding_facts(state.params, mesh), "mu": sharding_facts(adam.mu, mesh),
          "nu": sharding_facts(adam.nu, mesh)}


def move_checkpoint(state, setup_to, batch, directory):
  """Saves ``state`` (mesh A), restores it onto ``setup_to``'s mesh B and trains one more step there."""
  checkpointer = Checkpointer(directory)
  checkpointer.save(STEPS, state, meta={"note": "saved on mesh A"})
  checkpointer.close()
  restored = Checkpointer(directory).restore(setup_to.abstract_state, step=STEPS)
  facts = state_facts(restored, setup_to.mesh)
  restored_params = flat_params(restored.params)
  with jax.set_mesh(setup_to.mesh):
    restored, metrics = setup_to.train_step(restored, setup_to.shard_batch(batch))
  return restored_params, {"loss_after": float(metrics["loss"]), "step_after": int(jax.device_get(restored.step)),
                           "mesh": dict(zip(setup_to.mesh.axis_names, setup_to.mesh.axis_sizes)), **facts}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--case", action="append", required=True)
  parser.add_argument("--sharded-init", default=None)
  parser.add_argument("--checkpoint-from", default=None)
  parser.add_argument("--checkpoint-to", default=None)
  args = parser.parse_args()
  assert jax.device_count() == 8, jax.devices()
  train_config = TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ, warmup_steps=1, learning_rate=1e-2)
  batches = make_batches()
  results, arrays = {"cases": {}, "reference": {}, "timings": {}}, {}
  references, setups, states = {}, {}, {}
  for key in args.case:
    model, layout, axis_types = key.split("/")
    if model not in references:
      tick = time.perf_counter()
      losses, initial, after = reference_run(model_config(model), train_config, batches)
      references[model] = initial
      results["reference"][model] = losses
      arrays.update({f"{model}/reference/{k}": v for k, v in after.items()})
      arrays.update({f"{model}/reference_initial/{k}": v for k, v in flat_params(initial.params).items()})
      results["timings"][f"{model}/reference"] = time.perf_counter() - tick
    tick = time.perf_counter()
    setups[key], states[key], results["cases"][key], extra = sharded_run(
        model_config(model), train_config, batches, layout, axis_types, references[model], key == args.sharded_init)
    arrays.update({f"{key}/{k}": v for k, v in flat_params(states[key].params).items()})
    arrays.update({f"{key}/initial/{k}": v for k, v in extra.get("initial", {}).items()})
    results["timings"][key] = time.perf_counter() - tick
    print(f"{key}: {results['timings'][key]:.1f}s", file=sys.stderr, flush=True)
  if args.checkpoint_from:
    tick = time.perf_counter()
    restored, results["checkpoint"] = move_checkpoint(states[args.checkpoint_from], setups[args.checkpoint_to],
                                                      batches[STEPS], os.path.join(args.out, "checkpoint"))
    arrays.update({f"checkpoint/restored/{k}": v for k, v in restored.items()})
    results["timings"]["checkpoint"] = time.perf_counter() - tick
  np.savez(os.path.join(args.out, "arrays.npz"), **arrays)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
