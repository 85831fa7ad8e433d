"""Test set-up: 8 fake CPU devices for the whole suite (single-device tests use device 0)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu is installed for the TPU compile test (benchmark --topology); the suite runs on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
