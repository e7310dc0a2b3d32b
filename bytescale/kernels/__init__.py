"""Pallas kernels (and the cuDNN attention wrapper), each beside the jnp reference it must match.

* ``flash_attention.flash_attention`` -- fused attention ``(q, k, v, mask)`` (``bytescale.ops.mask.AttentionMask``
  semantics), Pallas fwd/bwd.
* ``cudnn_attention.cudnn_attention`` -- the same call mapped onto ``jax.nn.dot_product_attention`` cuDNN.
* ``patch_pool.patch_pool`` -- segment (patch) pooling, used by ``bytescale.ops.pooling.segment_pool``.
* ``common`` -- the Pallas plumbing they share (interpret mode, table specs, compiler params).

The attention kernels import ``bytescale.ops.mask`` (a leaf), never ``bytescale.ops.attention``, which imports
them lazily to dispatch ``impl``.

Submodules are imported explicitly (``from bytescale.kernels import flash_attention``) so that importing the
package does not import Pallas; names are not re-exported here because they equal the module names.
Every kernel takes ``interpret=None``: interpret mode on CPU, compiled on GPU (Triton) / TPU (Mosaic).

Every Pallas kernel also takes ``backend=None``: the backend whose block specs, default blocks and compiler
params to use; ``None`` is the local one (``jax.default_backend()``). Naming another backend lets a CPU host
*lower* (not compile, not run) the kernels for it, which runs Pallas' Mosaic/Triton lowering checks without the
device (``tests/test_kernel_lowering.py``). The abstract device names the target chip, which the lowering
queries (Triton: compute capability; Mosaic: TPU generation)::

  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  # GPU: AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"), backend="gpu"
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
    fn = lambda q, k, v, pos: flash_attention.flash_attention(
        q, k, v, AttentionMask.self_attention(pos), backend="tpu")
    text = jax.jit(fn).trace(*shape_dtype_structs).lower(lowering_platforms=("tpu",)).as_text()  # or "cuda"
"""

import jax

_BACKEND_ALIASES = {"cpu": "cpu", "tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def resolve_backend(backend: str | None = None) -> str:
  """The kernels' backend family, ``"cpu"``, ``"gpu"`` or ``"tpu"``; ``None`` means ``jax.default_backend()``.

  Accepts the platform names ``"cuda"`` and ``"rocm"`` for ``"gpu"`` (Pallas lowers both through Triton).
  """
  if backend is None:  # any other local platform runs the kernels like CPU: in interpret mode
    return _BACKEND_ALIASES.get(jax.default_backend(), "cpu")
  if backend not in _BACKEND_ALIASES:
    raise ValueError(f"backend must be one of {sorted(_BACKEND_ALIASES)} or None (local), got {backend!r}")
  return _BACKEND_ALIASES[backend]
