"""Train a small MegaByte on CPU and sample from it (a few minutes).

    python examples/train_megabyte.py [--data PATH|stdlib] [--steps 600] [--out runs/megabyte-example]

Starts from the ``tiny`` preset, widened a little (global D=128 over patches of P=4 bytes, so D_G=32; local
D=64), trains it with bytescale's training loop (grain pipeline, jitted steps, orbax checkpoints; rerunning
with the same ``--out`` resumes), reports validation bits per byte and prints a sample generated with the
patch-wise KV caches. ``bytescale generate --ckpt <out>`` samples from the same checkpoint.
"""

import argparse
import dataclasses
import time

from bytescale.models import registry
from bytescale import configs
from bytescale.data.pipeline import DataConfig
from bytescale.generate import SamplingConfig, generate
from bytescale.train.loop import train


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="stdlib", help="a text file, a directory or 'stdlib' (Python's own sources)")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--out", default="runs/megabyte-example")
  parser.add_argument("--prompt", default="def ")
  args = parser.parse_args()

  tiny = registry.get_preset("megabyte", "tiny")
  config = dataclasses.replace(
      tiny,
      global_stack=dataclasses.replace(tiny.global_stack, d_model=128, head_dim=32, mlp_hidden=352),
      local_stack=dataclasses.replace(tiny.local_stack, d_model=64, head_dim=16, mlp_hidden=192),
      max_seq_len=args.seq_len,
  )
  train_config = configs.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                     learning_rate=3e-3, warmup_steps=30, log_every=50, checkpoint_every=100)
  data_config = DataConfig(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=8_000_000)

  start = time.perf_counter()
  result = train(config, train_config, data_config, args.out, preset="tiny-wide")
  summary = result.summary
  print(f"{summary['params']:,} parameters, {summary['steps']} steps in {time.perf_counter() - start:.0f} s "
        f"({summary['bytes_per_s']:,.0f} bytes/s after compilation)")
  print(f"validation: {summary['val_bpb']:.3f} bits per byte over {summary['val_bytes']:,} bytes")
  sample = generate(result.model, [args.prompt.encode()], 300, sampling=SamplingConfig(temperature=0.7, top_p=0.95))[0]
  print("sample:\n" + args.prompt + sample.decode("utf-8", errors="replace"))


if __name__ == "__main__":
  main()
