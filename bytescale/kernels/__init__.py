"""Pallas kernels (and the cuDNN attention wrapper), each beside the jnp reference it must match.

* ``flash_attention.flash_attention`` -- fused attention (``bytescale.ops.attention`` semantics), Pallas fwd/bwd.
* ``cudnn_attention.cudnn_attention`` -- the same call mapped onto ``jax.nn.dot_product_attention`` cuDNN.
* ``patch_pool.patch_pool`` -- segment (patch) pooling, used by ``bytescale.ops.pooling.segment_pool``.

Submodules are imported explicitly (``from bytescale.kernels import flash_attention``) so that importing the
package does not import Pallas; names are not re-exported here because they equal the module names.
Every kernel takes ``interpret=None``: interpret mode on CPU, compiled on GPU (Triton) / TPU (Mosaic).
"""
