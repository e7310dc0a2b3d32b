"""Shared fixtures: tiny configs compiled once per session. Tests run on CPU (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bytescale import configs  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig  # noqa: E402


def tiny_bytelm_config(**stack_overrides) -> ByteLMConfig:
  stack = TransformerConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64)
  return ByteLMConfig(stack=configs.dataclasses.replace(stack, **stack_overrides), max_seq_len=64)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_config():
  return tiny_bytelm_config()


def assert_close(actual, expected, *, atol, rtol=0.0, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


jax.config.update("jax_default_matmul_precision", "highest")
