"""Thin Flax NNX modules over ``bytescale.ops``. Every parameter carries logical axis names."""

from bytescale.nn.layers import Embedding, RMSNorm, SwiGLU, param
from bytescale.nn.attention import Attention
from bytescale.nn.transformer import Block, KVCache, TransformerStack

__all__ = ["Attention", "Block", "Embedding", "KVCache", "RMSNorm", "SwiGLU", "TransformerStack", "param"]
