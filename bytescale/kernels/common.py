"""Pallas plumbing shared by the kernels: interpret mode, block-size arithmetic, specs for the small int tables
the kernels read as scalars, and the per-backend compiler params."""

from __future__ import annotations

from jax.experimental import pallas as pl


def resolve_interpret(interpret: bool | None, backend: str) -> bool:
  """``None`` -> interpret mode on CPU, compiled elsewhere; compiled on CPU is refused."""
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and backend == "cpu":
    raise ValueError("Pallas kernels run on CPU only in interpret mode (interpret=True or None)")
  return bool(interpret)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def table_spec(shape, index_map, backend: str):
  """Spec of a small int table read as scalars: SMEM on TPU; plain global memory on GPU / in interpret mode."""
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pl.BlockSpec(shape, index_map, memory_space=pltpu.SMEM)
  return pl.BlockSpec(shape, index_map)


def compiler_params(backend: str, interpret: bool, *, num_warps: int, dimension_semantics: tuple[str, ...]):
  """Triton: ``num_warps`` (and 2 pipeline stages); Mosaic: the grid axes' ``dimension_semantics``
  (``"parallel"`` / ``"arbitrary"``); None in interpret mode and on CPU."""
  if interpret:
    return None
  if backend == "gpu":
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
  return None
