"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_absl_verbosity():
    """Jobs called in-process (the demo, qponder-score) lower absl's verbosity for their own output; restore it so a
    later test's warnings still reach caplog."""
    verbosity = absl_logging.get_verbosity()
    yield
    absl_logging.set_verbosity(verbosity)
