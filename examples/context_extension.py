"""Extend a small byte-level model to 4x and 8x its training context without training, with the public API.

    python examples/context_extension.py [--data PATH] [--length 64] [--steps 500]

1. train a ByteLM at context L (``bytescale.train.loop.train``, which also writes a checkpoint);
2. score held-out text at 4L and 8L with the rotation as trained, PI, NTK, dynamic NTK and YaRN;
3. search LongRoPE factors for 8L (``bytescale.rope_search``; on the command line: ``bytescale rope-search
   --ckpt RUN --data PATH --target-length 8L``), save them as a ``rope_scaling`` JSON file, load the file into
   the model config with ``rope.apply_rope_scaling`` and score it;
4. generate 8L bytes with the LongRoPE model: the KV cache is recomputed once, when the length passes L, so the
   cached sampler gives exactly the logits of a full forward at every step.

A few minutes on a CPU. ``benchmarks/context_extension.py`` adds fine-tuning and a results table.
"""

import argparse
import json
import os

from bytescale import configs, rope_search
from bytescale.configs import ByteLMConfig, TransformerConfig
from bytescale.data.pipeline import DataConfig, frame_documents, split_stream
from bytescale.data.sources import load_documents
from bytescale.generate import SamplingConfig, generate
from bytescale.ops import rope
from bytescale.train.loop import train

# shared/data/tinyshakespeare.txt beside this checkout (never one machine's absolute path); where it is absent
# the default corpus is this Python's standard library (--data picks any file).
DEFAULT_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                       "tinyshakespeare.txt"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=DEFAULT_DATA if os.path.exists(DEFAULT_DATA) else "stdlib",
                      help="corpus: a file, directory, glob or 'stdlib' (default: ../shared/data/tinyshakespeare.txt "
                      "beside the checkout where present, else stdlib)")
  parser.add_argument("--length", type=int, default=64, help="training context L in bytes")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--out", default="runs/context_extension")
  args = parser.parse_args()
  length = args.length

  # 1. Train at L.
  model_config = ByteLMConfig(stack=TransformerConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                                                      head_dim=16, mlp_hidden=192), max_seq_len=length)
  data = DataConfig(source=args.data, seq_len=length, batch_size=16, max_bytes=2_000_000)
  result = train(model_config, configs.TrainConfig(steps=args.steps, batch_size=16, seq_len=length,
                                                   checkpoint_every=0), data, args.out)
  model = result.model
  print(f"trained at L = {length}: validation {result.summary['val_bpb']:.3f} bits per byte")

  # Held-out windows: the search uses the first half of the held-out tail, the scores below the second half.
  _, held_out = split_stream(frame_documents(load_documents(args.data, max_bytes=2_000_000)), 0.1)
  search_part, score_part = held_out[: len(held_out) // 2], held_out[len(held_out) // 2:]

  def bits_per_byte(rope_config, n):
    extended = rope_search.rebuild_with_config(model, rope.replace_rope(model.config, rope_config))
    return rope_search.bits_per_byte_fn(extended)(rope_search.held_out_windows(score_part, n, 4096 // n))

  # 2. Training-free methods, each configured for the 8L target.
  methods = rope_search.extension_configs(model.config.stack.rope, length, 8.0)
  print(f"{'method':10s} {'L':>7s} {'4L':>7s} {'8L':>7s}   (bits per byte)")
  for name, rope_config in methods.items():
    print(f"{name:10s} " + " ".join(f"{bits_per_byte(rope_config, n):7.3f}" for n in (length, 4 * length, 8 * length)))

  # 3. LongRoPE: search, save as a rope_scaling file, load it back into the model config.
  target = 8 * length
  found = rope_search.search_longrope(
      model, rope_search.held_out_windows(search_part, target, 8), target_length=target, original_length=length,
      search=rope_search.SearchConfig(population=16, iterations=6, mutations=4, crossovers=4, search_n_hat=True))
  path = os.path.join(args.out, f"longrope_{target}.json")
  with open(path, "w") as handle:
    json.dump(found.rope_scaling(), handle, indent=1)
  loaded = rope.apply_rope_scaling(model.config, path)
  print("longrope   " + " ".join(f"{bits_per_byte(loaded.stack.rope, n):7.3f}"
                                  for n in (length, 4 * length, 8 * length)) + f"   (factors in {path})")

  # 4. Sample 8L bytes with the cache: it crosses the short/long switch at L.
  extended = rope_search.rebuild_with_config(model, loaded)
  text = generate(extended, [b"ROMEO:\n"], target - 8, sampling=SamplingConfig(temperature=0.7))[0]
  print("--- sample with LongRoPE ---\nROMEO:\n" + text.decode("utf-8", errors="replace"))


if __name__ == "__main__":
  main()
