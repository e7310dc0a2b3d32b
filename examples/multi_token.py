"""Train a small ByteLM with 4 multi-token heads, then compare greedy with self-speculative decoding.

    python examples/multi_token.py [--data PATH|stdlib] [--steps 300] [--variant parallel|sequential]

The heads wrap any model config (``MultiTokenConfig(trunk=...)``; on the command line ``bytescale train --set
mtp_heads=4``). Training uses the memory-efficient multi-token loss; decoding runs the same model twice: plainly
(one forward per byte) and self-speculatively (the heads draft 3 bytes, one forward verifies them). The bytes
are identical; the second needs fewer forwards. A few minutes on a CPU.
"""

import argparse
import dataclasses
import time

import jax
import optax
from flax import nnx

from bytescale.models.registry import build_model
from bytescale.models import registry
from bytescale.data.pipeline import ByteCorpus, DataConfig, train_iterator
from bytescale.models.mtp import MultiTokenConfig, multi_token_loss
from bytescale.speculative import greedy_tokens, speculative_generate
from bytescale.vocab import decode


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="stdlib")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--variant", default="parallel", choices=["parallel", "sequential"])
  parser.add_argument("--max-new", type=int, default=200)
  args = parser.parse_args()

  trunk = registry.get_preset("bytelm", "tiny")
  trunk = dataclasses.replace(trunk, stack=dataclasses.replace(trunk.stack, d_model=96, head_dim=24, mlp_hidden=256,
                                                                num_layers=4))
  config = MultiTokenConfig(trunk=trunk, mtp_heads=4, mtp_variant=args.variant)
  data = DataConfig(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=4_000_000)
  corpus = ByteCorpus.load(data)
  batches = train_iterator(corpus, data)

  model = build_model(config, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 30, args.steps, 3e-4)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(
        lambda p: multi_token_loss(nnx.merge(graphdef, p), batch), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  print(f"{corpus.name}: {len(corpus.train_tokens):,} train tokens; "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters; 4 {args.variant} heads")
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    batch = {k: v for k, v in next(batches).items() if k in ("inputs", "targets", "segment_ids", "loss_mask")}
    params, opt_state, loss, aux = train_step(params, opt_state, batch)
    if step % 50 == 0 or step == args.steps:
      heads = "  ".join(f"head{i + 1} {float(aux[f'bpb_head{i + 1}']):.2f}" for i in range(4))
      print(f"step {step:4d}  loss {float(loss):.3f}  bits/byte: {heads}  ({time.perf_counter() - start:.0f} s)")

  model = nnx.merge(graphdef, params)
  prompts = [b"def __init__(self", b"import os\nimport sys\n\n", b"    return ", b"class "]
  for batch_prompts in (prompts[:1], prompts):
    tokens, greedy_seconds = greedy_tokens(model, batch_prompts, args.max_new)
    result = speculative_generate(model, batch_prompts, args.max_new, stop_at_eos=False)
    same = bool((tokens == result.tokens).all())
    print(f"\nbatch {len(batch_prompts)}: greedy {tokens.size / greedy_seconds:,.0f} bytes/s; speculative "
          f"{result.bytes_per_second:,.0f} bytes/s ({greedy_seconds / result.seconds:.2f}x), "
          f"{result.bytes_per_forward:.2f} bytes accepted per forward; identical bytes: {same}")
  print("\n--- sample (greedy = speculative) ---")
  print((prompts[0] + decode(result.tokens[0])).decode("utf-8", errors="replace"))


if __name__ == "__main__":
  main()
