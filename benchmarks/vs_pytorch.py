"""Each bytescale model against its PyTorch peer at equal configuration (CPU, float32): training and generation bytes/s.

Training at 1k and 4k bytes per row, greedy generation at batch 1 and 8.

  bash benchmarks/setup_pytorch_peer.sh            # once: a separate venv with CPU torch and the peers
  python benchmarks/vs_pytorch.py                  # the measurement: 5-8 minutes on a quiet 2-core CPU
  python benchmarks/vs_pytorch.py --quick          # smoke run (tiny rounds): proves the script, measures nothing
  python benchmarks/vs_pytorch.py --models bytelm --seq-lens 1024

Peers (in their own venv, never a dependency of bytescale):

* ByteLM (`small`: d 256, 6 layers, 8 heads of 32, 4 kv heads, SwiGLU MLP 704, vocab 260, untied output) vs
  ``transformers`` ``LlamaForCausalLM`` with the same widths, ``attn_implementation="sdpa"``.
* MegaByte (dims (512, 256), depths (6, 4), 8 heads of 64 in both stacks, P 8) vs MEGABYTE-pytorch, the shapes of
  the older MegaByte-only comparison (``megabyte_vs_pytorch.py``). The peer trains with its own loss (256 ids,
  id 0 ignored) on the row as given; its ``generate()`` samples, so greedy decoding here is the same loop with
  argmax: one full forward per byte, as its ``generate()`` does (it has no cache).
* BLT (`small`: encoder d 128 x 1 layer, global d 256 x 4 layers, decoder d 128 x 2 layers, local windows 128,
  k = 2 queries per patch, hash n-grams 3..8 with 8192 buckets each) vs ``transformers`` ``BltForCausalLM``
  (``patch_in_forward=False``: no patcher model is built). Both get the SAME patch lengths: SpaceByte's rule
  (``bytescale.patching`` "space"), computed from the bytes in numpy outside the timed step, so patching cost is
  not part of either figure. bytescale patches at ``max_patches = 0.5 x row`` (its preset) and runs its global
  model over the smallest of the preset's ``patch_buckets`` slot counts that holds the batch's largest patch count
  (as its training loop does); the peer runs its global model over that largest count. Known differences of the
  peer's design (not settings): its decoder cross-attends in its first layer only here
  (``cross_attn_all_layers=False``, bytescale's layout), its global input has no projection when k x d_E equals
  d_G, and its byte-to-patch cross-attention masks are dense.
  The peer's ``use_cache=True`` path patches only the new bytes of a step (patch lengths are not carried over and
  its global model keeps no cache), so greedy decoding there is one full forward per byte with ``use_cache=False``
  and the space patch lengths of the prefix (computed inside the timed loop, as bytescale's decoder patches inside
  its timed sampler).

Protocol: one worker process per side (bytescale in this venv, the peer in its venv); a worker builds its models,
runs one untimed warm-up step per shape (compilation on bytescale's side, allocator and threads on the peer's), then
answers one JSON command per line. The driver runs one model's pair at a time; training rounds alternate (the
order swapped every round) and both sides draw the same data windows (same seed, same calls). Optimizer on both
sides: AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1) after global-norm clipping at 1.0. Generation: greedy, after
a 512-byte prompt (BOS first where the vocabulary has one; its prefill is inside the timing on every side), bytes/s
counted over all rows of the batch; the no-cache peers decode inside a short timed window (at least 2 bytes).
Progress goes to stderr, each worker's log to /tmp/vs_pytorch.<model>.<side>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import DEFAULT_CORPUS, LineWorker, corpus_bytes, cpu_description, random_windows, time_call  # noqa: E402  (no jax here: peer workers import this file)

RESULTS = os.path.join(HERE, "RESULTS_vs_pytorch.md")
DEFAULT_PEER_PYTHON = "/tmp/bytescale-peer-venv/bin/python"
MODELS = ("bytelm", "megabyte", "blt")
PEERS = {"bytelm": "transformers LlamaForCausalLM", "megabyte": "MEGABYTE-pytorch",
         "blt": "transformers BltForCausalLM"}
SEQ_LENS = (1024, 4096)
# Rows per training step: a step takes about a second or more on a 2-core CPU.
BATCH = {("bytelm", 1024): 2, ("bytelm", 4096): 1, ("megabyte", 1024): 4, ("megabyte", 4096): 1,
         ("blt", 1024): 4, ("blt", 4096): 1}
GENERATE_BATCHES = (1, 8)
PROMPT_BYTES = 512
# Bytes generated per row by the cached decoders (bytescale's samplers are compiled for this many; Llama's
# generate() makes exactly this many); the no-cache peers stop at their timed window instead.
CACHED_GENERATE_BYTES = {"jax": 256, "llama": 64}
BOS, PAD, VOCAB = 256, 258, 260  # bytescale.vocab's ids (not imported: the peer venv has no bytescale)

# bytescale's presets, spelled out for the peer side.
BYTELM_SHAPE = dict(d=256, layers=6, heads=8, kv_heads=4, head_dim=32, mlp=704)
MEGABYTE_SHAPE = dict(dims=(512, 256), depths=(6, 4), heads=8, head_dim=64, patch=8)
BLT_SHAPE = dict(d_e=128, l_e=1, heads_e=4, mlp_e=352, d_g=256, l_g=4, heads_g=8, mlp_g=704, d_d=128, l_d=2, heads_d=4,
           mlp_d=352, window=128, k=2, ngrams=(3, 4, 5, 6, 7, 8), buckets=8192, patches_ratio=0.5)
ADAMW = dict(lr=3e-4, b1=0.9, b2=0.95, weight_decay=0.1, clip=1.0)
PEAK_SIZE = 1024  # the square float32 matmul each side's peak is measured with (as benchmarks/throughput.py does)


# --- Data and patches (numpy only: both venvs run this) --------------------------------------------------------

def prompts(data, batch: int, with_bos: bool):
  """``batch`` prompts of PROMPT_BYTES corpus bytes (different text per row), BOS first if ``with_bos``."""
  import numpy as np

  rows = np.stack([data[b * 4096:b * 4096 + PROMPT_BYTES] for b in range(batch)]).astype(np.int64)
  return np.concatenate([np.full((batch, 1), BOS, np.int64), rows], axis=1) if with_bos else rows


def space_starts(ids_BxT):
  """SpaceByte's patch starts of single-document rows (bytescale.patching's "space" rule, in numpy): byte t opens a
  patch iff t == 0 or byte t-1 ends one; byte u ends a patch iff it is special (>= 256) or spacelike (not an ASCII
  letter or digit, not a UTF-8 continuation byte) and byte u-1 is not spacelike (or u == 0)."""
  import numpy as np

  ids = np.asarray(ids_BxT)
  alnum = ((ids >= 48) & (ids <= 57)) | ((ids >= 65) & (ids <= 90)) | ((ids >= 97) & (ids <= 122))
  spacelike = ~(alnum | ((ids >= 0x80) & (ids < 0xC0)))
  previous_spacelike = np.concatenate([np.zeros_like(spacelike[:, :1]), spacelike[:, :-1]], axis=1)
  ends = (ids >= 256) | (spacelike & ~previous_spacelike)
  starts = np.concatenate([np.ones_like(ends[:, :1]), ends[:, :-1]], axis=1)
  return starts


def patch_lengths(starts_BxT):
  """Bytes per patch, each row padded with zeros to the batch's largest patch count."""
  import numpy as np

  rows = [np.diff(np.append(np.flatnonzero(s), s.shape[0])) for s in starts_BxT]
  out = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


# --- bytescale workers -------------------------------------------------------------------------------------------

class JaxWorker:
  """One bytescale model: a jitted AdamW train step per row length and a greedy sampler per generation batch."""

  def __init__(self, model_name: str, args):
    sys.path.insert(0, os.path.dirname(HERE))
    import jax
    import numpy as np
    from flax import nnx

    from bytescale.configs import TrainConfig
    from bytescale.generate import SamplingConfig, frame_prompts, make_sampler
    from bytescale.models import build_model
    from bytescale.train.state import init_train_state, make_optimizer
    from bytescale.train.step import make_train_step

    self.jax, self.np, self.nnx, self.frame_prompts = jax, np, nnx, frame_prompts
    self.model_name, self.seq_lens = model_name, args.seq_lens
    config, loss_fn = getattr(self, f"_{model_name}")(max(args.seq_lens))
    self.config = config
    model = build_model(config, seed=0)
    sampler_graphdef, _ = nnx.split(model)
    train_config = TrainConfig(steps=10**6, batch_size=1, seq_len=max(args.seq_lens), learning_rate=ADAMW["lr"],
                               warmup_steps=0, b1=ADAMW["b1"], b2=ADAMW["b2"], weight_decay=ADAMW["weight_decay"],
                               grad_clip=ADAMW["clip"])
    optimizer = make_optimizer(train_config)
    self.graphdef, self.state = init_train_state(model, optimizer)
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
    self.step = jax.jit(make_train_step(self.graphdef, optimizer, loss_fn), donate_argnums=0)
    self.generate_bytes = CACHED_GENERATE_BYTES["jax"] if not args.quick else 32
    self.samplers = {b: make_sampler(sampler_graphdef, self.generate_bytes, SamplingConfig(temperature=0.0),
                                     1 + PROMPT_BYTES + self.generate_bytes) for b in args.generate_batches}
    self.data = corpus_bytes(args.data)
    self.rng = np.random.default_rng(0)
    self.space_rule_checked = False
    for t in args.seq_lens:
      self.train(t, 1)  # compiles; draws the same windows as the peer's warm-up step
    for b in args.generate_batches:
      self.generate(b)  # compiles

  def _bytelm(self, max_len):
    import dataclasses

    from bytescale.models import bytelm
    from bytescale.train.step import next_byte_loss

    config = dataclasses.replace(bytelm.PRESETS["small"], max_seq_len=max_len)
    s = config.stack
    assert (s.d_model, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_hidden) == tuple(
        BYTELM_SHAPE[k] for k in ("d", "layers", "heads", "kv_heads", "head_dim", "mlp")), "ByteLM small preset changed"
    return config, next_byte_loss

  def _megabyte(self, max_len):
    from bytescale.configs import TransformerConfig
    from bytescale.models.megabyte import MegaByteConfig
    from bytescale.train.step import next_byte_loss

    def stack(d, layers):
      return TransformerConfig(d_model=d, num_layers=layers, num_heads=MEGABYTE_SHAPE["heads"],
                               num_kv_heads=MEGABYTE_SHAPE["heads"], head_dim=MEGABYTE_SHAPE["head_dim"],
                               mlp_hidden=-(-(8 * d // 3) // 32) * 32)

    (d_g, d_l), (l_g, l_l) = MEGABYTE_SHAPE["dims"], MEGABYTE_SHAPE["depths"]
    config = MegaByteConfig(global_stack=stack(d_g, l_g), local_stack=stack(d_l, l_l),
                            patch_size=MEGABYTE_SHAPE["patch"], max_seq_len=max_len)
    return config, next_byte_loss

  def _blt(self, max_len):
    import dataclasses

    import jax.numpy as jnp

    from bytescale.models import blt
    from bytescale.ops.losses import masked_cross_entropy
    from bytescale.patching import PatchingConfig

    preset = blt.PRESETS["small"]
    # Space patching at generation (the same rule the peer's prefixes are cut with); training is fed patches.
    config = dataclasses.replace(preset, max_seq_len=max_len, patching=PatchingConfig(
        "space", max_patches_ratio=BLT_SHAPE["patches_ratio"]))
    e, g, d = config.encoder, config.global_stack, config.decoder
    shapes = (e.d_model, e.num_layers, e.num_heads, e.mlp_hidden, g.d_model, g.num_layers, g.num_heads, g.mlp_hidden,
              d.d_model, d.num_layers, d.num_heads, d.mlp_hidden, e.window, config.queries_per_patch,
              config.hash_ngrams, config.hash_buckets, preset.patching.max_patches_ratio)
    assert d.window == e.window and shapes == tuple(BLT_SHAPE[k] for k in (
        "d_e", "l_e", "heads_e", "mlp_e", "d_g", "l_g", "heads_g", "mlp_g", "d_d", "l_d", "heads_d", "mlp_d", "window",
        "k", "ngrams", "buckets", "patches_ratio")), f"BLT small preset changed: {shapes}"

    def fed_patches_loss(model, batch):
      output = model(batch["inputs"], batch["segment_ids"], patches=batch["patches"])
      nll_sum, count = masked_cross_entropy(output.logits_BxTxV, batch["targets"], batch["loss_mask"])
      return nll_sum / jnp.maximum(count, 1.0), {"nll_sum": nll_sum, "count": count}

    from bytescale import patching
    self.patches_from_starts = self.jax.jit(patching.patches_from_starts, static_argnums=2)
    self.space_reference = self.jax.jit(patching.space, static_argnames="max_patches")
    from bytescale.train.buckets import choose_slots
    self.choose_slots, self.bucket_slots = choose_slots, config.patching.bucket_slots
    return config, fed_patches_loss

  def batch(self, t):
    np = self.np
    rows = random_windows(self.data, self.rng, BATCH[self.model_name, t], t + 1).astype(np.int32)
    ones = np.ones((rows.shape[0], t), np.int32)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": ones,
             "loss_mask": ones.astype(np.float32)}
    if self.model_name == "blt":
      starts = space_starts(batch["inputs"])
      max_patches = int(np.ceil(BLT_SHAPE["patches_ratio"] * t))
      patches = self.patches_from_starts(starts, ones, max_patches)
      if not self.space_rule_checked:  # the numpy rule is bytescale's own: checked once per worker
        reference = self.space_reference(batch["inputs"], ones, max_patches=max_patches)
        assert (np.asarray(reference.lengths_BxM) == np.asarray(patches.lengths_BxM)).all(), "space rule differs"
        self.space_rule_checked = True
      assert int(np.asarray(patches.overflow_bytes_B).sum()) == 0, "max_patches overflowed: raise patches_ratio"
      # The training path's bucketed slots (bytescale.train.buckets): the global model runs over the smallest
      # bucket that holds the batch's largest patch count, compiled once per bucket.
      largest = int(np.asarray(patches.valid_BxM).sum(axis=1).max())
      patches = patches.truncated(self.choose_slots(largest, self.bucket_slots(t)))
      batch["patches"] = self.jax.block_until_ready(patches)
    return batch

  def train(self, t, steps):
    times, loss, patch_counts = [], None, []
    for _ in range(steps):
      batch = self.batch(t)  # patches, if any, are made here: outside the timed step
      if "patches" in batch:
        patch_counts.append(float(self.np.asarray(batch["patches"].valid_BxM).sum(axis=1).mean()))
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, batch)
      loss = float(metrics["loss"])  # blocks until the step is done
      times.append(time.perf_counter() - start)
    patches_per_row = statistics.mean(patch_counts) if patch_counts else None
    return {"step_seconds": times, "loss": loss, "rows": BATCH[self.model_name, t], "patches_per_row": patches_per_row,
            "flops_per_byte": self.training_flops_per_byte(t, patches_per_row)}

  def training_flops_per_byte(self, t, patches_per_row):
    """Model FLOPs of one trained byte (``bytescale.flops``, exact convention: forward + backward = 3 x forward, no
    recomputation counted); BLT at the patch size the batch had."""
    if self.model_name == "blt":
      from bytescale.models.blt import flops_per_byte

      return flops_per_byte(self.config, t, t / patches_per_row).training
    from bytescale.models.registry import flops_per_byte

    return flops_per_byte(self.config, t).training

  def matmul_peak(self):
    import jax.numpy as jnp

    a = jnp.ones((PEAK_SIZE, PEAK_SIZE), jnp.float32)
    matmul = self.jax.jit(lambda x, y: x @ y)
    return {"flops_per_second": 2 * PEAK_SIZE**3 / time_call(lambda: matmul(a, a).block_until_ready())}

  def generate(self, batch):
    ids, lengths = self.frame_prompts([bytes(row.astype("uint8")) for row in prompts(self.data, batch, False)])
    _, params = self.nnx.split(self.state.model(self.graphdef))  # the trained parameters (train donates buffers)
    start = time.perf_counter()
    out = self.samplers[batch](params, ids, lengths, self.jax.random.key(0))
    out.block_until_ready()
    return {"seconds": time.perf_counter() - start, "bytes_per_row": int(out.shape[1]), "rows": batch}

  def meta(self):
    import jax

    return {"params": self.params, "framework": f"jax {jax.__version__}", "python": sys.version.split()[0]}


# --- PyTorch workers -----------------------------------------------------------------------------------------------

class TorchWorker:
  """Common to the peers: AdamW + clipping, timed steps, greedy loops without a cache."""

  with_bos = True

  def __init__(self, model_name: str, args):
    import numpy as np
    import torch

    torch.manual_seed(0)
    self.torch, self.np, self.model_name, self.args = torch, np, model_name, args
    self.model = self.build()
    self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
    decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
    self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                                        {"params": no_decay, "weight_decay": 0.0}],
                                       lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]))
    self.data = corpus_bytes(args.data)
    self.rng = np.random.default_rng(0)
    self.window = args.generate_window
    for t in args.seq_lens:
      self.train(t, 1)  # warm-up (allocator, threads); the same windows as bytescale's compile step
    for b in args.generate_batches:
      self.generate(b, warmup=True)

  def train(self, t, steps):
    torch = self.torch
    self.model.train()
    times, loss, patch_counts = [], None, []
    for _ in range(steps):
      rows = random_windows(self.data, self.rng, BATCH[self.model_name, t], t + 1)
      extras = self.extras(rows[:, :-1])  # patch lengths, if any: outside the timed step
      if extras is not None:
        patch_counts.append(float((extras > 0).sum(dim=1).float().mean()))
      inputs, targets = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
      start = time.perf_counter()
      loss = self.loss(inputs, targets, extras)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), ADAMW["clip"])
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
      times.append(time.perf_counter() - start)
    return {"step_seconds": times, "loss": loss.item(), "rows": BATCH[self.model_name, t],
            "patches_per_row": statistics.mean(patch_counts) if patch_counts else None}

  def extras(self, inputs_BxT):
    return None

  def matmul_peak(self):
    a = self.torch.ones((PEAK_SIZE, PEAK_SIZE), dtype=self.torch.float32)
    return {"flops_per_second": 2 * PEAK_SIZE**3 / time_call(lambda: a @ a)}

  def loss(self, inputs, targets, extras):
    logits = self.logits(inputs, extras)
    return self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

  def generate(self, batch, warmup=False):
    """Greedy, one full forward over the prefix per byte (the peers' own decoding has no usable cache)."""
    torch = self.torch
    self.model.eval()
    ids = torch.from_numpy(prompts(self.data, batch, self.with_bos))
    window = 0.0 if warmup else self.window
    with torch.no_grad():
      start, made = time.perf_counter(), 0
      while made < 2 or time.perf_counter() - start < window:
        logits = self.logits(ids, self.extras(ids.numpy()))[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        made += 1
      seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes_per_row": made, "rows": batch}

  def meta(self):
    import torch

    return {"params": self.params, "framework": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
            + self.versions(), "python": sys.version.split()[0]}

  def versions(self):
    import transformers

    return f", transformers {transformers.__version__}"


class LlamaWorker(TorchWorker):
  def build(self):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = BYTELM_SHAPE
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=c["d"], intermediate_size=c["mlp"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                         num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"],
                         max_position_embeddings=max(self.args.seq_lens) + 1, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                         bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=self.torch.float32)
    model.generation_config.eos_token_id = None
    return model

  def logits(self, inputs, extras):
    return self.model(input_ids=inputs, use_cache=False).logits

  def generate(self, batch, warmup=False):
    """HF ``generate``: greedy with its KV cache, exactly CACHED_GENERATE_BYTES["llama"] new bytes."""
    torch = self.torch
    self.model.eval()
    ids = torch.from_numpy(prompts(self.data, batch, True))
    new = 2 if warmup else (CACHED_GENERATE_BYTES["llama"] if not self.args.quick else 8)
    with torch.no_grad():
      start = time.perf_counter()
      out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, use_cache=True, pad_token_id=PAD)
      seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes_per_row": int(out.shape[1] - ids.shape[1]), "rows": batch}


class MegaByteWorker(TorchWorker):
  with_bos = False  # 256 ids: no BOS

  def build(self):
    from MEGABYTE_pytorch import MEGABYTE

    c = MEGABYTE_SHAPE
    return MEGABYTE(num_tokens=256, dim=c["dims"], depth=c["depths"], dim_head=c["head_dim"], heads=c["heads"],
                    max_seq_len=(max(self.args.seq_lens) // c["patch"], c["patch"]))

  def loss(self, inputs, targets, extras):
    # Its own loss (a start token predicts the row's first byte; id 0 ignored): its design, as in the older script.
    return self.model(inputs, return_loss=True)

  def logits(self, inputs, extras):
    return self.model(inputs)

  def versions(self):
    from importlib.metadata import version

    return f", MEGABYTE-pytorch {version('MEGABYTE-pytorch')}"


class BltWorker(TorchWorker):
  def build(self):
    from transformers import BltConfig, BltForCausalLM

    c, longest = BLT_SHAPE, max(self.args.seq_lens) + 1
    rope = {"rope_type": "default", "rope_theta": 10000.0}

    def local(d, layers, heads, mlp):
      return dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  intermediate_size=mlp, cross_attn_all_layers=False, cross_attn_k=c["k"], hidden_size_global=c["d_g"],
                  max_position_embeddings=longest, rms_norm_eps=1e-5, rope_parameters=dict(rope), vocab_size=VOCAB)

    config = BltConfig(
        vocab_size=VOCAB, max_position_embeddings=longest, patch_in_forward=False, patching_mode="space",
        local_attention_window_len=c["window"], cross_attn_k=c["k"],
        encoder_hash_byte_group_size=list(c["ngrams"]), encoder_hash_byte_group_vocab=c["buckets"],
        encoder_hash_byte_group_nb_functions=1, rope_parameters=dict(rope),
        encoder_config=local(c["d_e"], c["l_e"], c["heads_e"], c["mlp_e"]),
        decoder_config=local(c["d_d"], c["l_d"], c["heads_d"], c["mlp_d"]),
        global_config=dict(hidden_size=c["d_g"], num_hidden_layers=c["l_g"], num_attention_heads=c["heads_g"],
                           num_key_value_heads=c["heads_g"], intermediate_size=c["mlp_g"],
                           max_position_embeddings=longest, rms_norm_eps=1e-5, rope_parameters=dict(rope)),
        bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None)
    model = BltForCausalLM._from_config(config, attn_implementation="sdpa", dtype=self.torch.float32)
    assert model.model.patcher is None
    return model

  def extras(self, inputs_BxT):
    return self.torch.from_numpy(patch_lengths(space_starts(inputs_BxT)))

  def logits(self, inputs, extras):
    return self.model(input_ids=inputs, patch_lengths=extras, use_cache=False).logits


TORCH_WORKERS = {"bytelm": LlamaWorker, "megabyte": MegaByteWorker, "blt": BltWorker}


def run_worker(side: str, model_name: str, args):
  if side == "torch":
    # benchmarks/ holds a kernels.py, which would shadow the `kernels` package transformers tries to import.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
  worker = JaxWorker(model_name, args) if side == "jax" else TORCH_WORKERS[model_name](model_name, args)
  print(json.dumps({"ready": worker.meta()}), flush=True)
  for line in sys.stdin:
    command = json.loads(line)
    if command["cmd"] == "quit":
      break
    if command["cmd"] == "train":
      result = worker.train(command["seq_len"], command["steps"])
    elif command["cmd"] == "peak":
      result = worker.matmul_peak()
    else:
      result = worker.generate(command["batch"])
    print(json.dumps(result), flush=True)


# --- Driver ----------------------------------------------------------------------------------------------------

class WorkerProcess(LineWorker):
  def __init__(self, model_name, side, python, args):
    command = [python, os.path.abspath(__file__), "--worker", side, "--models", model_name, "--data", args.data,
               "--seq-lens", ",".join(map(str, args.seq_lens)),
               "--generate-batches", ",".join(map(str, args.generate_batches)),
               "--generate-window", str(args.generate_window)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    if side == "jax":
      env.setdefault("JAX_PLATFORMS", "cpu")
    super().__init__("bytescale" if side == "jax" else PEERS[model_name], command,
                     f"/tmp/vs_pytorch.{model_name}.{side}.log", env, quit_timeout=120)
    self.steps = {}  # seq_len -> [seconds]
    self.rows, self.losses, self.patches, self.generation = {}, {}, {}, {}
    self.flops_per_byte, self.peaks = {}, {}  # seq_len -> model FLOPs per byte (bytescale's side), [FLOP/s]


class Progress:
  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self, message: str):
    print(f"[vs_pytorch {time.perf_counter() - self.start:6.0f} s] {message}", file=sys.stderr, flush=True)


def compare(model_name: str, args, progress) -> list[WorkerProcess]:
  pair = []
  try:
    for side, python in (("jax", sys.executable), ("torch", args.peer_python)):
      # One at a time: start-up (compilation, warm-up steps) is not measured but must not overlap the other's.
      pair.append(WorkerProcess(model_name, side, python, args))
      pair[-1].wait_ready()
      progress(f"{model_name}: {pair[-1].name} ready, {pair[-1].meta['params']:,} parameters")
    for t in args.seq_lens:
      for r in range(args.rounds):
        for w in (pair if r % 2 == 0 else pair[::-1]):
          # Each side's matmul peak just before its steps: the machine's speed drifts within a run.
          w.peaks.setdefault(t, []).append(w.ask({"cmd": "peak"})["flops_per_second"])
          result = w.ask({"cmd": "train", "seq_len": t, "steps": args.steps_per_round})
          w.steps.setdefault(t, []).extend(result["step_seconds"])
          w.rows[t], w.losses[t], w.patches[t] = result["rows"], result["loss"], result["patches_per_row"]
          if "flops_per_byte" in result:
            w.flops_per_byte[t] = result["flops_per_byte"]
          progress(f"{model_name} {t} bytes, round {r + 1}/{args.rounds}, {w.name}: "
                   f"steps {', '.join('%.2f' % s for s in result['step_seconds'])} s")
    for i, b in enumerate(args.generate_batches):
      for w in (pair if i % 2 == 0 else pair[::-1]):
        result = w.ask({"cmd": "generate", "batch": b})
        w.generation[b] = result
        progress(f"{model_name} generate batch {b}, {w.name}: {result['bytes_per_row']} bytes/row in "
                 f"{result['seconds']:.2f} s")
  finally:
    for w in pair:
      w.close()
  return pair


def train_rate(w, t):
  return w.rows[t] * t / statistics.median(w.steps[t])


def generate_rate(w, b):
  g = w.generation[b]
  return g["rows"] * g["bytes_per_row"] / g["seconds"]


def flops_table(args, results: dict, bold: str) -> list[str]:
  """Training rates as FLOP/s against each side's float32 matmul peak, measured in the same rounds: how close each
  side is to what this machine's matmuls allow, and what "2x the peer" would take."""
  lines = ["### Training against the matmul peak", "",
           f"Model FLOPs per trained byte from `bytescale.flops` (exact convention: forward + backward = 3 x forward, "
           f"causal attention as the keys each query sees, no recomputation), the same count for both sides (equal "
           f"shapes; BLT at the measured patch size). Matmul peak: a {PEAK_SIZE}-square float32 matmul in each "
           f"worker's framework, measured just before each of its training rounds (median). \"2x the peer needs\": "
           f"twice the peer's FLOP/s, as a share of bytescale's (JAX's) peak: above 100%, the same FLOPs would have to "
           f"run faster than this machine's large float32 matmul does.", "",
           "| model | bytes/row | model MFLOP/byte | matmul peak GFLOP/s JAX / torch | bytescale MFU "
           "| peer, of torch's peak | peer, of JAX's peak | 2x the peer needs (of JAX's peak) |",
           "|---|---|---|---|---|---|---|---|"]
  for model_name, (ours, peer) in results.items():
    for t in args.seq_lens:
      flops = ours.flops_per_byte.get(t)
      if not flops:
        continue
      jax_peak, torch_peak = statistics.median(ours.peaks[t]), statistics.median(peer.peaks[t])
      ours_fps, peer_fps = train_rate(ours, t) * flops, train_rate(peer, t) * flops
      lines.append(f"| {model_name} vs {peer.name} | {t} | {flops / 1e6:.1f} | {jax_peak / 1e9:.0f} / "
                   f"{torch_peak / 1e9:.0f} | {100 * ours_fps / jax_peak:.1f}% | {100 * peer_fps / torch_peak:.1f}% | "
                   f"{100 * peer_fps / jax_peak:.1f}% | {bold}{200 * peer_fps / jax_peak:.0f}%{bold} |")
  return lines


def report(args, results: dict, machine_at_start: str, command: str, loaded: bool) -> tuple[str, str]:
  if args.quick:
    title = "Smoke run under load, not a measurement" if loaded else "Smoke run, not a measurement"
  else:
    title = "bytescale vs PyTorch peers (CPU)" + (", under load: ratios unreliable" if loaded else "")
  lines = [f"`{command}`", "", f"Machine at start: {machine_at_start}.", f"Load at end: {cpu_description()}.", ""]
  if args.quick:
    lines += ["Tiny rounds (--quick) prove that the script runs end to end; these figures are NOT a measurement "
              "and no ratio here may be quoted.", ""]
  bold = "" if args.quick else "**"
  any_pair = next(iter(results.values()))
  lines += [f"bytescale: {any_pair[0].meta['framework']}, Python {any_pair[0].meta['python']}. Peers: "
            + "; ".join(f"{pair[1].name}: {pair[1].meta['framework']}, Python {pair[1].meta['python']}"
                        for pair in results.values()) + ".",
            f"{args.rounds} alternating round(s) of {args.steps_per_round} step(s) per row length after one untimed "
            f"warm-up step each (medians over all timed steps); float32; AdamW + clipping on both sides. Generation: "
            f"greedy after a {PROMPT_BYTES}-byte prompt (its prefill timed too), bytes/s over all rows; bytescale's "
            f"cached samplers and Llama's cached `generate()` make a fixed number of bytes, the no-cache peers "
            + (f"decode for about {args.generate_window:g} s (at least 2 bytes)." if args.generate_window > 0
               else "decode 2 bytes."), "",
            "### Training", "",
            "| model | bytes/row x rows | params bytescale / peer | bytescale bytes/s | peer bytes/s | "
            "bytescale / peer | final loss bytescale / peer |",
            "|---|---|---|---|---|---|---|"]
  for model_name, (ours, peer) in results.items():
    for t in args.seq_lens:
      note = f" (patches/row {ours.patches[t]:.1f} / {peer.patches[t]:.1f})" if ours.patches.get(t) else ""
      lines.append(f"| {model_name} vs {peer.name}{note} | {t} x {ours.rows[t]} | {ours.meta['params']:,} / "
                   f"{peer.meta['params']:,} | {train_rate(ours, t):,.0f} | {train_rate(peer, t):,.0f} | "
                   f"{bold}{train_rate(ours, t) / train_rate(peer, t):.2f}x{bold} | {ours.losses[t]:.3f} / "
                   f"{peer.losses[t]:.3f} |")
  lines += ["", *flops_table(args, results, bold), "", "### Greedy generation", "",
            "| model | batch | bytescale bytes/s (bytes/row) | peer bytes/s (bytes/row) | bytescale / peer |",
            "|---|---|---|---|---|"]
  for model_name, (ours, peer) in results.items():
    for b in args.generate_batches:
      ours_rate, peer_rate = generate_rate(ours, b), generate_rate(peer, b)
      ours_bytes, peer_bytes = ours.generation[b]["bytes_per_row"], peer.generation[b]["bytes_per_row"]
      lines.append(f"| {model_name} vs {peer.name} | {b} | {ours_rate:,.1f} ({ours_bytes}) | {peer_rate:,.1f} "
                   f"({peer_bytes}) | {bold}{ours_rate / peer_rate:.1f}x{bold} |")
  lines += ["", "All timed training steps (s):", ""]
  for model_name, (ours, peer) in results.items():
    for t in args.seq_lens:
      lines.append(f"- {model_name} {t}: bytescale {', '.join('%.2f' % s for s in ours.steps[t])}; peer "
                   f"{', '.join('%.2f' % s for s in peer.steps[t])}")
  lines += ["", "Parameter counts differ only where the designs do: ByteLM and Llama match tensor for tensor; BLT "
            "matches except bytescale's global-input projection (k x d_E -> d_G, 65,536), byte-to-decoder projection "
            "(16,384) and BOS slots (256); MegaByte differs throughout (bytescale: a byte position table, SwiGLU "
            "MLPs, 260 ids; the peer: GELU MLPs with biases, its own patch embedder, 256 ids). Losses are not "
            "comparable across sides (different initialisations; MEGABYTE-pytorch's loss ignores id 0)."]
  return title, "\n".join(lines)


def write_results(title: str, body: str):
  from common import write_section

  if not os.path.exists(RESULTS):
    with open(RESULTS, "w") as f:
      f.write("# bytescale vs PyTorch peers\n\nWritten by `benchmarks/vs_pytorch.py` (its docstring describes the "
              "configurations and protocol); each kind of run replaces its own section.\n")
  write_section(RESULTS, title, body)


def parse_ints(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, short generation (not a measurement)")
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
  parser.add_argument("--seq-lens", type=parse_ints, default=SEQ_LENS, help="bytes per training row, e.g. 1024,4096")
  parser.add_argument("--generate-batches", type=parse_ints, default=GENERATE_BATCHES)
  parser.add_argument("--data", default=DEFAULT_CORPUS,
                      help="corpus file (default: shared/data/tinyshakespeare.txt beside the checkout)")
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the peers' venv")
  parser.add_argument("--rounds", type=int, default=None, help="alternating training rounds (default 2, quick 1)")
  parser.add_argument("--steps-per-round", type=int, default=1)
  parser.add_argument("--generate-window", type=float, default=None,
                      help="seconds the no-cache peers decode for (default 3, quick 0)")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
  unknown = sorted(set(args.models) - set(MODELS))
  if unknown or not args.models:
    parser.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
  missing = [t for t in args.seq_lens for m in args.models if (m, t) not in BATCH]
  if missing:
    parser.error(f"--seq-lens: no batch size set for {sorted(set(missing))}; choose from {SEQ_LENS} or add it to BATCH")
  args.generate_window = args.generate_window if args.generate_window is not None else (0.0 if args.quick else 3.0)
  if args.worker:
    run_worker(args.worker, args.models[0], args)
    return
  if not os.path.exists(args.peer_python):
    sys.exit(f"--peer-python: {args.peer_python} not found; run `bash benchmarks/setup_pytorch_peer.sh` first")
  if not os.path.exists(args.data):
    sys.exit(f"--data: {args.data} not found; pass a corpus file")
  args.rounds = args.rounds or (1 if args.quick else 2)
  from common import machine

  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU against CPU torch; the workers inherit it
  load_at_start, cores = os.getloadavg()[0], os.cpu_count() or 1
  machine_at_start = machine()
  progress = Progress()
  progress(f"{machine_at_start}; models {', '.join(args.models)}, rows {args.seq_lens}, {args.rounds} round(s)")
  results = {m: compare(m, args, progress) for m in args.models}
  command = "python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
  title, body = report(args, results, machine_at_start, command, loaded=load_at_start > 0.5 * cores)
  print(f"## {title}\n\n{body}")
  if not args.no_write:
    write_results(title, body)
    progress(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
