"""Shared pytest setup: quiet TensorFlow, keep JAX on the CPU, float32."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
