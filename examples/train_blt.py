"""Train a BLT in its two stages, then sample from it: a few minutes on a CPU.

    python examples/train_blt.py [--data PATH|stdlib] [--out runs/blt_example] [--target-patch-size 4]

1. Entropy model: a small sliding-window ByteLM (preset ``bytelm/entropy-tiny``) trained with the ordinary
   training loop; the same as ``bytescale train --model bytelm --preset entropy-tiny --out OUT/entropy``.
2. Threshold: the global entropy threshold that gives ``--target-patch-size`` bytes per patch on a sample of the
   corpus (``bytescale.entropy.threshold_for_patch_size``; ``bytescale entropy-threshold`` does the same).
3. BLT (preset ``blt/tiny``) with ``entropy_model=OUT/entropy``: patches are computed from the frozen entropy model
   before each jitted train step, which runs at the smallest bucket of patch slots that holds them (docs/blt.md);
   ``bytescale train --model blt --preset tiny --set entropy_model=OUT/entropy --set threshold=...`` does the same
   from the shell.
4. Validation bits per byte, and a sample decoded with the caches (the global model runs only when a patch
   closes). ``bytescale generate --ckpt OUT/blt`` samples from the saved checkpoint.
"""

import argparse
import dataclasses
import os
import time

import numpy as np

from bytescale.models import registry
from bytescale import configs, entropy
from bytescale.data.pipeline import ByteCorpus, DataConfig
from bytescale.generate import SamplingConfig, generate
from bytescale.train.checkpoint import load_entropy_model
from bytescale.train.loop import train

# shared/data/tinyshakespeare.txt beside this checkout (never one machine's absolute path); where it is absent
# the default corpus is this Python's standard library (--data picks any file).
SHAKESPEARE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                       "tinyshakespeare.txt"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=SHAKESPEARE if os.path.exists(SHAKESPEARE) else "stdlib",
                      help="corpus: a file, directory, glob or 'stdlib' (default: ../shared/data/tinyshakespeare.txt "
                      "beside the checkout where present, else stdlib)")
  parser.add_argument("--out", default="runs/blt_example")
  parser.add_argument("--entropy-steps", type=int, default=300)
  parser.add_argument("--blt-steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--target-patch-size", type=float, default=4.0)
  parser.add_argument("--max-bytes", type=int, default=2_000_000)
  args = parser.parse_args()

  data = DataConfig(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes)
  corpus = ByteCorpus.load(data)
  print(f"{corpus.name}: {len(corpus.train_tokens):,} train tokens")

  # 1. The entropy model.
  entropy_dir = os.path.join(args.out, "entropy")
  started = time.perf_counter()
  result = train(registry.get_preset("bytelm", "entropy-tiny"),
                 configs.TrainConfig(steps=args.entropy_steps, batch_size=args.batch_size, seq_len=args.seq_len),
                 data, entropy_dir, preset="entropy-tiny", corpus=corpus)
  print(f"entropy model: {result.summary['val_bpb']:.3f} bits/byte ({time.perf_counter() - started:.0f} s)")

  # 2. The threshold for the target patch size, on a sample of the training split.
  lm = load_entropy_model(entropy_dir)
  h, segs = entropy.sample_entropies(lm, corpus.train_tokens[: 64 * args.seq_len], seq_len=args.seq_len)
  threshold, size = entropy.threshold_for_patch_size(h, segs, args.target_patch_size)
  print(f"threshold {threshold:.4f} nats -> {size:.2f} bytes per patch (entropies: median {np.median(h):.2f})")

  # 3. The BLT, patching with the frozen entropy model before each train step.
  config = registry.get_preset("blt", "tiny")
  config = dataclasses.replace(config, entropy_model=entropy_dir,
                               patching=dataclasses.replace(config.patching, threshold=threshold))
  blt_dir = os.path.join(args.out, "blt")
  started = time.perf_counter()
  result = train(config, configs.TrainConfig(steps=args.blt_steps, batch_size=args.batch_size, seq_len=args.seq_len),
                 data, blt_dir, preset="tiny", corpus=corpus)
  print(f"BLT: {result.summary['val_bpb']:.3f} bits/byte, {result.summary['params']:,} parameters "
        f"({time.perf_counter() - started:.0f} s); metrics in {blt_dir}/metrics.jsonl")

  # 4. A sample, decoded with the caches.
  prompt = b"ROMEO:\n" if "shakespeare" in corpus.name else b"def "
  sample = generate(result.model, [prompt], 200, sampling=SamplingConfig(temperature=0.7, top_p=0.95))[0]
  print("sample:\n" + (prompt + sample).decode("utf-8", errors="replace"))


if __name__ == "__main__":
  main()
