"""Test set-up: eight fake CPU devices, fixed before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tokdiff  # noqa: E402,F401  (applies the flax variable-sharding setting)
