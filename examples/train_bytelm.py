"""Train a small byte-level transformer with bytescale's pieces, as an outside user would.

    python examples/train_bytelm.py [--data PATH|stdlib] [--steps 400]

Builds the model from a preset, packs documents with the grain pipeline, runs a hand-written jitted train step
over ``nnx.split`` state, reports validation bits per byte and prints a sample. A few minutes on a CPU.
"""

import argparse
import dataclasses
import time

import jax
import optax
from flax import nnx

from bytescale.models import registry
from bytescale.data.pipeline import ByteCorpus, DataConfig, train_iterator
from bytescale.generate import SamplingConfig, generate
from bytescale.models import ByteLM
from bytescale.train.evaluate import evaluate_bpb
from bytescale.train.step import next_byte_loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="stdlib")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=16)
  args = parser.parse_args()

  config = registry.get_preset("bytelm", "tiny")
  wider = dataclasses.replace(config.stack, d_model=128, head_dim=32, mlp_hidden=352)
  config = dataclasses.replace(config, stack=wider)
  data = DataConfig(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=8_000_000)
  corpus = ByteCorpus.load(data)
  batches = train_iterator(corpus, data)

  model = ByteLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 40, args.steps, 3e-4)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: next_byte_loss(nnx.merge(graphdef, p), batch)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  print(f"{corpus.name}: {len(corpus.train_tokens):,} train tokens; "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    batch = {k: v for k, v in next(batches).items() if k in ("inputs", "targets", "segment_ids", "loss_mask")}
    params, opt_state, loss = train_step(params, opt_state, batch)
    if step % 50 == 0:
      rate = step * args.batch_size * args.seq_len / (time.perf_counter() - start)
      print(f"step {step:5d}  loss {float(loss):.3f}  {rate:,.0f} bytes/s")

  bpb, count = evaluate_bpb(graphdef, params, corpus.validation_tokens, seq_len=args.seq_len, batch_size=16,
                            max_batches=32)
  print(f"validation: {bpb:.3f} bits per byte over {count:,} bytes")
  trained = nnx.merge(graphdef, params)
  sample = generate(trained, [b"def "], 200, sampling=SamplingConfig(temperature=0.7, top_p=0.95))[0]
  print("sample:\ndef " + sample.decode("utf-8", errors="replace"))


if __name__ == "__main__":
  main()
