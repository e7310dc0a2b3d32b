"""One forward pass of BLT at the released size (``blt-1b`` preset, random weights, no download) on this CPU.

    python benchmarks/blt_released_size.py [--preset blt-1b] [--bytes 1024] [--repeats 3]

A row of ``--bytes`` bytes of the default corpus goes through the whole model as ``BLT.forward`` runs it: the
entropy model (float32), entropy patching, encoder, global model, decoder. Random entropy models are unsure of
everything (every entropy near ln 260), so the patching threshold is set to the entropy quantile that gives the
paper's average patch size of 4.5 on this row, rather than the released threshold. Weights are float32 (4.5 B
parameters: 18 GB, three quarters of them hash tables), written in place one variable at a time so the host never
holds a second copy. Reports compile + first call, the median of ``--repeats`` calls, and the process's peak
resident memory, to benchmarks/RESULTS_blt.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import DEFAULT_CORPUS, machine, write_section  # noqa: E402
from bytescale import patching  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale.models.blt import BLT  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_blt.md")


def random_model(config, seed: int = 0) -> BLT:
  """The model with N(0, 1/fan_in) matrices, unit norms and N(0, 1) tables, filled variable by variable."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BLT(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  chunk = 1 << 24

  def fill(path, variable):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = variable.shape
    array = np.empty(shape, np.float32)
    flat = array.reshape(-1)
    if name.endswith("scale"):
      flat[:] = 1.0
    else:
      fan_in = shape[-2] if len(shape) >= 2 else 1
      std = 1.0 if ("table" in name or name.endswith("bos_slots")) else float(fan_in) ** -0.5
      for start in range(0, flat.size, chunk):
        stop = min(flat.size, start + chunk)
        flat[start:stop] = rng.standard_normal(stop - start, dtype=np.float32) * std
    return variable.replace(jax.dlpack.from_dlpack(array))  # zero-copy on the CPU when aligned

  state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="blt-1b")
  parser.add_argument("--bytes", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data", default=DEFAULT_CORPUS)
  parser.add_argument("--patch-size", type=float, default=4.5, help="average patch size the threshold aims at")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args(argv)
  header = machine()
  print(header, file=sys.stderr)
  config = registry.get_preset("blt", args.preset)
  t0 = time.perf_counter()
  model = random_model(config)
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n_frozen = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model))) - n_params
  print(f"{args.preset}: {n_params:,} parameters + {n_frozen:,} frozen, filled in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr)
  with open(args.data, "rb") as f:
    row = np.frombuffer(f.read(args.bytes - 1), np.uint8).astype(np.int32)
  ids = jnp.asarray(np.concatenate([[256], row])[None], jnp.int32)  # BOS + bytes

  entropies = np.asarray(nnx.jit(lambda m, x: m.entropies(x))(model, ids))[0]
  threshold = float(np.quantile(entropies[:-1], 1 - 1 / args.patch_size))
  patch_config = dataclasses.replace(config.patching, threshold=threshold)

  @nnx.jit
  def forward(m, x):
    h = m.entropies(x)
    patches = patching.patch(patch_config, x, entropies_BxT=h)
    out, _ = m.forward(x, patches=patches)
    return out.logits_BxTxV, patches.num_patches_B

  t0 = time.perf_counter()
  logits, num_patches = forward(model, ids)
  logits.block_until_ready()
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    forward(model, ids)[0].block_until_ready()
    times.append(time.perf_counter() - t0)
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  assert bool(jnp.isfinite(logits).all())
  patches = int(num_patches[0])
  result = (f"| `{args.preset}` | {n_params:,} + {n_frozen:,} frozen | {args.bytes} | {patches} "
            f"({args.bytes / patches:.2f} bytes/patch) | {first:.1f} | {statistics.median(times):.2f} | "
            f"{peak_gib:.1f} |")
  print(result)
  body = (f"{header}\n\n`python benchmarks/blt_released_size.py --preset {args.preset} --bytes {args.bytes} "
          f"--repeats {args.repeats}`: random float32 weights (no download), one row of the default corpus, the whole "
          "forward as `BLT.forward` runs it (entropy model, entropy patching at the threshold that gives "
          f"{args.patch_size} bytes per patch on this row, encoder, global model, decoder).\n\n"
          "| preset | parameters | bytes | patches | compile + first call (s) | forward, median (s) "
          "| peak RSS (GiB) |\n|---|---|---|---|---|---|---|\n" + result)
  if not args.no_write:
    write_section(RESULTS, f"Released size on CPU ({args.preset})", body)


if __name__ == "__main__":
  main()
