"""One forward pass of BLT at the released size (``blt-1b`` preset, random weights, no download) on this CPU.

    python benchmarks/blt_released_size.py [--preset blt-1b] [--bytes 1024] [--repeats 3]

A row of ``--bytes`` bytes of the default corpus goes through the whole model as ``BLT.forward`` runs it: the
entropy model (float32), entropy patching, encoder, global model, decoder. Random entropy models are unsure of
everything (every entropy near ln 260), so the patching threshold is set to the entropy quantile that gives the
paper's average patch size of 4.5 on this row, rather than the released threshold. Weights are float32 (4.5 B
parameters: 18 GB, two thirds of them hash tables), each variable computed on the device into its own buffer (a
hash of the element index) so nothing holds a second copy. Reports compile + first call, the median of
``--repeats`` calls, and the process's peak resident memory, to benchmarks/RESULTS_blt.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def pseudo_random(shape, std: float, seed: int, dtype):
  """Uniform values of standard deviation ``std`` from a hash of the element index, computed on the device a chunk
  of rows at a time into the one output buffer (no host copy and no temporary the size of the array: the weights
  alone take most of this machine's 23 GB)."""
  rows, width = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, int(shape[0]))
  chunk = max(1, min(rows, (1 << 22) // width))
  offset = jnp.uint32((seed * 0x85EBCA6B + 1) & 0xFFFFFFFF)

  def body(i, buffer):
    start = jnp.minimum(i * chunk, rows - chunk)  # the last chunk overlaps the previous one: values only
    index = (start * width).astype(jnp.uint32) + jax.lax.iota(jnp.uint32, chunk * width)
    h = index * jnp.uint32(0x9E3779B1) + offset
    h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
    h = h ^ (h >> 12)
    unit = (h >> 8).astype(jnp.float32) * (2.0 / 2**24) - 1.0  # uniform in [-1, 1): variance 1/3
    values = (unit * (std * 3.0**0.5)).astype(dtype).reshape(chunk, width)
    return jax.lax.dynamic_update_slice(buffer, values, (start, 0))

  buffer = jax.lax.fori_loop(0, -(-rows // chunk), body, jnp.zeros((rows, width), dtype))
  return buffer.reshape(shape)


def random_model(config, hash_dtype=jnp.float32) -> BLT:
  """The model with matrices of std 1/sqrt(fan_in), unit norms and tables of std 1, filled variable by variable."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BLT(config, rngs=nnx.Rngs(0))))
  seeds = iter(range(1, 1 << 20))

  def fill(path, variable):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = tuple(variable.shape)
    if name.endswith("scale"):
      return variable.replace(jnp.ones(shape, jnp.float32))
    fan_in = shape[-2] if len(shape) >= 2 else 1
    std = 1.0 if ("table" in name or name.endswith("bos_slots")) else float(fan_in) ** -0.5
    dtype = hash_dtype if name == "hash_table" else jnp.float32
    return variable.replace(jax.block_until_ready(pseudo_random(shape, std, next(seeds), dtype)))

  state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="blt-1b")
  parser.add_argument("--bytes", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data", default=DEFAULT_CORPUS)
  parser.add_argument("--patch-size", type=float, default=4.5, help="average patch size the threshold aims at")
  parser.add_argument("--hash-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="store the hash tables (3 of blt-1b's 4.5 B parameters) in this dtype; bfloat16 fits a "
                           "machine with less than ~24 GB")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args(argv)
  header = machine()
  print(header, file=sys.stderr)
  config = registry.get_preset("blt", args.preset)
  t0 = time.perf_counter()
  model = random_model(config, jnp.dtype(args.hash_dtype))
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n_frozen = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model))) - n_params
  print(f"{args.preset}: {n_params:,} parameters + {n_frozen:,} frozen, filled in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr)
  with open(args.data, "rb") as f:
    row = np.frombuffer(f.read(args.bytes - 1), np.uint8).astype(np.int32)
  ids = jnp.asarray(np.concatenate([[256], row])[None], jnp.int32)  # BOS + bytes

  # jax.jit over the split state (nnx.jit would hand the whole state back as outputs: a second copy of 12 GB).
  graphdef, state = nnx.split(model)
  del model
  entropies = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st).entropies(x))(state, ids))[0]
  threshold = float(np.quantile(entropies[:-1], 1 - 1 / args.patch_size))
  patch_config = dataclasses.replace(config.patching, threshold=threshold)

  @jax.jit
  def forward(st, x):
    m = nnx.merge(graphdef, st)
    h = m.entropies(x)
    patches = patching.patch(patch_config, x, entropies_BxT=h)
    out, _ = m.forward(x, patches=patches)
    return out.logits_BxTxV, patches.num_patches_B

  t0 = time.perf_counter()
  logits, num_patches = forward(state, ids)
  logits.block_until_ready()
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    forward(state, ids)[0].block_until_ready()
    times.append(time.perf_counter() - t0)
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  assert bool(jnp.isfinite(logits).all())
  patches = int(num_patches[0])
  result = (f"| `{args.preset}` | {n_params:,} + {n_frozen:,} frozen | {args.bytes} | {patches} "
            f"({args.bytes / patches:.2f} bytes/patch) | {first:.1f} | {statistics.median(times):.2f} | "
            f"{peak_gib:.1f} |")
  print(result)
  body = (f"{header}\n\n`python benchmarks/blt_released_size.py --preset {args.preset} --bytes {args.bytes} "
          f"--repeats {args.repeats} --hash-dtype {args.hash_dtype}`: random weights (no download; float32, hash "
          f"tables {args.hash_dtype}), one row of the default corpus, the whole "
          "forward as `BLT.forward` runs it (entropy model, entropy patching at the threshold that gives "
          f"{args.patch_size} bytes per patch on this row, encoder, global model, decoder).\n\n"
          "| preset | parameters | bytes | patches | compile + first call (s) | forward, median (s) "
          "| peak RSS (GiB) |\n|---|---|---|---|---|---|---|\n" + result)
  if not args.no_write:
    write_section(RESULTS, f"Released size on CPU ({args.preset})", body)


if __name__ == "__main__":
  main()
