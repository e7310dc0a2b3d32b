"""The KV cache's layout (keys ``BxGxSxK``, values ``BxGxKxS``, one buffer per layer) against numpy float64."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale.configs import TransformerConfig
from bytescale.nn.attention import Attention
from bytescale.nn.transformer import TransformerStack
from tests.conftest import assert_close

CONFIG = TransformerConfig(d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, mlp_hidden=32)


def test_init_cache_has_one_buffer_per_layer_in_the_documented_layouts():
  cache = TransformerStack(CONFIG, rngs=nnx.Rngs(0)).init_cache(batch=2, max_len=7)
  assert len(cache.k_LxBxGxSxK) == len(cache.v_LxBxGxKxS) == 3
  assert all(k.shape == (2, 2, 7, 4) for k in cache.k_LxBxGxSxK)
  assert all(v.shape == (2, 2, 4, 7) for v in cache.v_LxBxGxKxS)
  assert cache.max_len == 7


@pytest.mark.parametrize("window", [None, 3])
def test_attention_decode_writes_and_reads_the_cache_layout(rng, window):
  """Ragged rows: the new keys/values land at each row's own slots in the layouts, and the output is attention
  over slot s = position s, brute force in float64 (values read as ``v[b, g, :, s]``)."""
  config = dataclasses.replace(CONFIG, window=window)
  attention = Attention(config, rngs=nnx.Rngs(1))
  b, n, g, s, k, h = 2, 2, 2, 9, 4, 4
  x = rng.normal(size=(b, n, 16)).astype(np.float32)
  k_cache = rng.normal(size=(b, g, s, k)).astype(np.float32)
  v_cache = rng.normal(size=(b, g, k, s)).astype(np.float32)
  lengths = np.array([1, 5], np.int32)

  out, new_k, new_v = attention.decode(jnp.asarray(x), jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(lengths))
  q, k_new, v_new = (np.asarray(a, np.float64) for a in attention.decode_qkv(jnp.asarray(x), jnp.asarray(lengths)))

  keys, values = k_cache.astype(np.float64), v_cache.astype(np.float64)
  for row in range(b):
    for i in range(n):
      keys[row, :, lengths[row] + i, :] = k_new[row, i]
      values[row, :, :, lengths[row] + i] = v_new[row, i]
  assert_close(new_k, keys, atol=1e-6)
  assert_close(new_v, values, atol=1e-6)

  wo = np.asarray(attention.wo[...], np.float64)
  expected = np.zeros((b, n, 16))
  for row in range(b):
    for i in range(n):
      position = lengths[row] + i
      visible = [t for t in range(s) if t <= position and (window is None or position - t < window)]
      heads = np.zeros((h, k))
      for head in range(h):
        group = head // (h // g)
        scores = np.array([q[row, i, head] @ keys[row, group, t] for t in visible]) / np.sqrt(k)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        heads[head] = sum(w * values[row, group, :, t] for w, t in zip(weights, visible))
      expected[row, i] = np.einsum("hk,hkd->d", heads, wo)
  assert_close(out, expected, atol=1e-5)
