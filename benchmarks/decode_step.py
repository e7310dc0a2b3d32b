"""One greedy decode step of ByteLM ``small`` over a KV cache: where its time goes, and the cache's layout.

    python benchmarks/decode_step.py            # about 10 minutes on 2 CPU cores
    python benchmarks/decode_step.py --quick    # fewer rounds

At batch 1 and 8, with a cache of 768 slots filled to 384 (random weights and bytes; speed does not depend on
them), in one process:

1. the decode step: ``--steps`` greedy steps in one jitted ``fori_loop`` (as ``bytescale.generate`` runs them),
   cache donated, per step; the library's ``model.decode`` against ``legacy_decode`` below, the previous
   decoding (keys and values stacked ``LxBxSxGxK``, a ``lax.scan`` over the layers, ``ops.attention`` reading the
   caches as stored) rebuilt from the same modules, alternating, after checking that both give the same logits;
2. one layer's cached attention (projections, cache write, attention over the cache, output projection), library
   vs legacy;
3. the ops the step's time goes to (``jax.profiler``, event durations summed by XLA op name), both;
4. the library's decode step of the other models' ``small`` presets (``--models``).

Results go to ``benchmarks/RESULTS_decode.md`` (machine, load average, date, jax version beside them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import profile_ops  # noqa: E402
from benchmarks.common import machine, write_section  # noqa: E402
from bytescale import configs  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale.models.mtp import MultiTokenConfig  # noqa: E402
from bytescale.ops.mask import AttentionMask  # noqa: E402
from bytescale.ops.rows import write_rows  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS_decode.md")
SLOTS, FILLED = 768, 384


# --- The previous cache layout, for comparison in one process ---------------------------------------------------

def legacy_attention_decode(attention, x_BxNxD, k_cache_BxSxGxK, v_cache_BxSxGxK, lengths_B):
  """``Attention.decode`` as it was with caches ``BxSxGxK``: ``ops.attention`` reads them as stored."""
  n = x_BxNxD.shape[1]
  positions_BxN = lengths_B[:, None] + jnp.arange(n, dtype=jnp.int32)
  q, k, v = attention.decode_qkv(x_BxNxD, lengths_B)
  k_cache = write_rows(k_cache_BxSxGxK, k, lengths_B)
  v_cache = write_rows(v_cache_BxSxGxK, v, lengths_B)
  mask = AttentionMask.kv_cache(positions_BxN, k_cache.shape[1], lengths_B + n, window=attention.config.window)
  return attention.attend(q, k_cache.astype(attention.dtype), v_cache.astype(attention.dtype), mask), k_cache, v_cache


def legacy_init_cache(model, batch: int, slots: int):
  c = model.config.stack
  shape = (c.num_layers, batch, slots, c.num_kv_heads, c.head_dim)
  return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype), jnp.zeros((batch,), jnp.int32)


def legacy_decode(model, cache, bytes_BxN):
  """ByteLM's decode with the previous layout; ``cache = (k_LxBxSxGxK, v_LxBxSxGxK, lengths_B)``."""
  k_LxBxSxGxK, v_LxBxSxGxK, lengths_B = cache
  x = model.embed(bytes_BxN).astype(model.compute_dtype)
  graphdef, state = nnx.split(model.stack.blocks)

  def layer(x, inputs):
    layer_state, k_cache, v_cache = inputs
    attend = lambda attention, h: (lambda out, k, v: (out, (k, v)))(  # noqa: E731
        *legacy_attention_decode(attention, h, k_cache, v_cache, lengths_B))
    x, (k_cache, v_cache) = nnx.merge(graphdef, layer_state).apply_with(x, attend)
    return x, (k_cache, v_cache)

  x, (k, v) = jax.lax.scan(layer, x, (state, k_LxBxSxGxK, v_LxBxSxGxK))
  return model.unembed(x), (k, v, lengths_B + bytes_BxN.shape[1])


# --- Timing and profiling ---------------------------------------------------------------------------------------

def library_decode(model, cache, bytes_BxN):
  out, cache = model.decode(cache, bytes_BxN)
  return out.logits_BxTxV, cache


def make_steps(graphdef, decode, rollback, steps: int):
  """``steps`` greedy steps from ``(cache, last_B)``; the cache comes back with its old lengths
  (``rollback(model, cache, n_B)``), so every call does the same work. Cache donated, as in generation's loop."""

  def run(state, cache, last_B):
    model = nnx.merge(graphdef, state)  # closed over by the loop body, as in bytescale.generate

    def body(_, carry):
      cache, last_B = carry
      logits, cache = decode(model, cache, last_B[:, None])
      return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    cache, last_B = jax.lax.fori_loop(0, steps, body, (cache, last_B))
    return rollback(model, cache, jnp.full_like(last_B, steps)), last_B

  return jax.jit(run, donate_argnums=1)


def library_rollback(model, cache, n_B):
  return model.rollback(cache, n_B)


def legacy_rollback(model, cache, n_B):
  k, v, lengths_B = cache
  return k, v, lengths_B - n_B


def prefilled(graphdef, state, decode, cache, batch: int):
  prompt = jax.random.randint(jax.random.key(1), (batch, FILLED), 0, 256, dtype=jnp.int32)
  logits, cache = jax.jit(lambda s, c, p: decode(nnx.merge(graphdef, s), c, p))(state, cache, prompt)
  return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), logits


def op_times(fn, args_fn, calls: int):
  """Per call: ``{op name: ms}``, self time summed over the XLA CPU threads' events (``profile_ops``' reader)."""
  events, _ = profile_ops.trace_calls(lambda: jax.block_until_ready(fn(*args_fn())), calls)
  times, _ = profile_ops.op_times(events)
  return {name: ns / calls / 1e6 for name, ns in times.items()}


def top_ops_text(times: dict, count: int = 6) -> str:
  ranked = sorted(times.items(), key=lambda item: -item[1])[:count]
  return ", ".join(f"{name} {ms:.2f}" for name, ms in ranked)


def streaming_floor(floats: int, steps: int, rounds: int) -> list[float]:
  """Seconds per step of the cheapest way found to read ``floats`` float32 numbers once per step: one matvec (a
  ``1 x 256`` row times a ``256 x floats/256`` matrix), ``steps`` per jitted ``fori_loop`` call as in the decode
  loop. A decode step reads at least its weights and caches once: this is its floor here."""
  width = 256
  matrix = jnp.full((width, -(-floats // width)), 1e-3, jnp.float32)

  @jax.jit
  def run(x_BxD, matrix):
    def body(_, x_BxD):
      return x_BxD + 1e-6 * (x_BxD @ matrix)[:, :width]
    return jax.lax.fori_loop(0, steps, body, x_BxD)

  x_BxD = jnp.ones((1, width), jnp.float32)
  jax.block_until_ready(run(x_BxD, matrix))
  seconds = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(run(x_BxD, matrix))
    seconds.append((time.perf_counter() - start) / steps)
  return seconds


def timed_rounds(runs: dict, state, steps: int, rounds: int) -> dict:
  """Seconds per step of each run, ``rounds`` times, alternating (two warm-up calls each: compilation)."""
  def call(name):
    run = runs[name]
    start = time.perf_counter()
    run[1], last = run[0](state, run[1], run[2])
    jax.block_until_ready(last)
    return (time.perf_counter() - start) / steps

  times = {name: [] for name in runs}
  for name in runs:
    call(name)
    call(name)
  for _ in range(rounds):
    for name in runs:
      times[name].append(call(name))
  return times


def other_model_config(name: str):
  """The ``small`` preset; BLT with space patching (no entropy model to train), multi-token heads: 4 parallel
  heads on ByteLM ``small`` (plain greedy decoding: trunk and head 1)."""
  if name == "mtp":
    return MultiTokenConfig(trunk=registry.get_preset("bytelm", "small"), mtp_heads=4)
  config = registry.get_preset(name, "small")
  return configs.replace_path(config, "patching.patcher", "space") if name == "blt" else config


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer rounds")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--steps", type=int, default=16, help="decode steps per timed call")
  parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5, --quick 3)")
  parser.add_argument("--models", default="megabyte,blt,mtp",
                      help="other models whose decode step is timed too (library only; 'none' for none)")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  rounds = args.rounds or (3 if args.quick else 5)
  machine_line = machine()
  print(machine_line, file=sys.stderr)

  config = registry.get_preset("bytelm", "small")
  model = registry.build_model(config)
  graphdef, state = nnx.split(model)
  c = config.stack
  step_rows, attention_rows, profile_rows = [], [], []
  for batch in [int(b) for b in args.batches.split(",")]:
    paths = {"library": (library_decode, library_rollback, model.init_cache(batch, SLOTS)),
             "legacy LxBxSxGxK": (legacy_decode, legacy_rollback, legacy_init_cache(model, batch, SLOTS))}
    runs, logits = {}, {}
    for name, (decode, rollback, cache) in paths.items():
      cache, last_B, logits[name] = prefilled(graphdef, state, decode, cache, batch)
      runs[name] = [make_steps(graphdef, decode, rollback, args.steps), cache, last_B]
    difference = float(jnp.max(jnp.abs(logits["library"] - logits["legacy LxBxSxGxK"])))
    if difference > 1e-4:
      raise SystemExit(f"the two layouts disagree at batch {batch}: max |logit difference| {difference}")
    times = timed_rounds(runs, state, args.steps, rounds)
    # Parameters plus both caches of every layer (the attention reads every slot of them at each step).
    cache_floats = 2 * c.num_layers * batch * c.num_kv_heads * SLOTS * c.head_dim
    floats = sum(x.size for x in jax.tree.leaves(state)) + cache_floats
    times[f"floor: {4 * floats / 2**20:.1f} MiB read once"] = streaming_floor(floats, args.steps, rounds)
    for name in times:
      ms = 1e3 * np.median(times[name])
      step_rows.append(f"| {batch} | {name} | {ms:.2f} | {', '.join(f'{1e3 * t:.2f}' for t in times[name])} | "
                       f"{batch / ms * 1e3:.0f} |")
      print(step_rows[-1], file=sys.stderr)

    # One layer: projections, cache write, attention over the cache, output projection.
    attention_graph, attention_state = nnx.split(model.stack.blocks.attention)
    layer_state = jax.tree.map(lambda a: a[0], attention_state)  # layer 0 of the stacked parameters
    h_Bx1xD = jax.random.normal(jax.random.key(2), (batch, 1, c.d_model), c.dtype)
    lengths_B = jnp.full((batch,), FILLED, jnp.int32)
    library_cache = model.init_cache(batch, SLOTS)
    per_layer = {
        "library": (lambda attention, h, k, v, n: attention.decode(h, k, v, n),
                    (library_cache.k_LxBxGxSxK[0], library_cache.v_LxBxGxKxS[0])),
        "legacy LxBxSxGxK": (legacy_attention_decode, jax.tree.map(lambda a: a[0], legacy_init_cache(model, batch,
                                                                                                   SLOTS)[:2])),
    }
    layer_times = {name: [] for name in per_layer}
    layer_runs = {}
    for name, (fn, (k, v)) in per_layer.items():
      def one_layer(layer_state, h, k, v, lengths_B, fn=fn):
        return fn(nnx.merge(attention_graph, layer_state), h, k, v, lengths_B)

      layer_runs[name] = [jax.jit(one_layer, donate_argnums=(2, 3)), k, v]

    def layer_call(name, repeats=50):
      run = layer_runs[name]
      start = time.perf_counter()
      for _ in range(repeats):
        out, run[1], run[2] = run[0](layer_state, h_Bx1xD, run[1], run[2], lengths_B)
      jax.block_until_ready(out)
      return (time.perf_counter() - start) / repeats

    for name in per_layer:
      layer_call(name, 5)
      layer_call(name, 5)
    for _ in range(rounds):
      for name in per_layer:
        layer_times[name].append(layer_call(name))
    for name in per_layer:
      attention_rows.append(f"| {batch} | {name} | {1e6 * np.median(layer_times[name]):.0f} | "
                            f"{', '.join(f'{1e6 * t:.0f}' for t in layer_times[name])} |")
      print(attention_rows[-1], file=sys.stderr)

    for name, run in runs.items():
      def args_fn(run=run):
        return state, run[1], run[2]

      def fn(*call_args, run=run):
        cache, last = run[0](*call_args)
        run[1] = cache
        return last

      ops = op_times(fn, args_fn, calls=3)
      per_step = {op: ms / args.steps for op, ms in ops.items()}
      total = sum(per_step.values())
      profile_rows.append(f"| {batch} | {name} | {total:.2f} | {top_ops_text(per_step)} |")
      print(profile_rows[-1], file=sys.stderr)

  other_rows = []
  for name in [] if args.models == "none" else args.models.split(","):
    other = registry.build_model(other_model_config(name))
    other_graph, other_state = nnx.split(other)
    for batch in [int(b) for b in args.batches.split(",")]:
      cache, last_B, _ = prefilled(other_graph, other_state, library_decode, other.init_cache(batch, SLOTS), batch)
      runs = {name: [make_steps(other_graph, library_decode, library_rollback, args.steps), cache, last_B]}
      seconds = timed_rounds(runs, other_state, args.steps, rounds)[name]
      ms = 1e3 * np.median(seconds)
      other_rows.append(f"| {name} | {batch} | {ms:.2f} | {', '.join(f'{1e3 * t:.2f}' for t in seconds)} | "
                        f"{batch / ms * 1e3:.0f} |")
      print(other_rows[-1], file=sys.stderr)

  command = "`benchmarks/decode_step.py" + (" --quick" if args.quick else "") + "`"
  body = "\n".join([
      f"Machine: {machine_line}. Command: {command}. The machine is shared: figures were taken under the load "
      f"average shown (2 cores), so they are noisy; compare only rows of one section (one process, alternating).",
      "",
      f"ByteLM `small` (d {c.d_model}, {c.num_layers} layers, {c.num_heads} heads, {c.num_kv_heads} kv heads, head "
      f"dim {c.head_dim}), float32, cache of {SLOTS} slots filled to {FILLED}, greedy, {args.steps} steps per jitted "
      f"`fori_loop` call, cache donated. `library`: `model.decode` as it is now; `legacy LxBxSxGxK`: the previous "
      f"cache (keys and values stacked `LxBxSxGxK`, a `lax.scan` over the layers), rebuilt in this script from the "
      f"same modules (same logits checked). `floor`: the time to read the parameters and both caches once per step "
      f"(one matvec-shaped matmul over a matrix of their size, `streaming_floor`), measured right after: a step "
      f"cannot be faster than this on this machine.",
      "",
      "Decode step (median of alternating rounds):",
      "",
      "| batch | cache layout | ms/step | rounds (ms/step) | bytes/s |",
      "|---|---|---|---|---|",
      *step_rows,
      "",
      "One layer's cached attention (projections, cache write, attention over the cache, output projection; one new "
      "byte per row; jitted, caches donated):",
      "",
      "| batch | cache layout | us/layer | rounds (us) |",
      "|---|---|---|---|",
      *attention_rows,
      "",
      "Where a decode step's time goes (`jax.profiler`, XLA CPU events summed by op name, ms per step; the sum "
      "counts both threads and can exceed the wall time):",
      "",
      "| batch | cache layout | summed ms/step | top ops (ms/step) |",
      "|---|---|---|---|",
      *profile_rows,
      *([] if not other_rows else [
          "",
          "Other models' decode step, library only (`small` presets, same cache and steps; BLT with space "
          "patching, `mtp`: 4 parallel heads on ByteLM `small`, plain greedy decoding):",
          "",
          "| model | batch | ms/step | rounds (ms/step) | bytes/s |",
          "|---|---|---|---|---|",
          *other_rows,
      ]),
  ])
  title = f"Decode step, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
  print(body)
  if not args.no_write:
    write_section(RESULTS, title, body)


if __name__ == "__main__":
  main()
