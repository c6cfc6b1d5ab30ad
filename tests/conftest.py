"""Shared pytest setup: quiet TensorFlow, keep JAX on the CPU, float32."""

import os

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The suite compiles far more than it runs, so XLA's LLVM backend runs at
# -O0: on 2 cores the tiny NFNet's train step compiles in ~8 s instead of
# 11-19 s (F0's: 29-39 s instead of 38-52 s), its steps run 1.3-1.8x slower.
# And XLA:CPU emits its kernels with the older elemental emitters, which
# compile the tiny models' many small fusions about 2x faster (the whole
# suite: 16% less time on a 2-core Zen 3; the full-size F0 train step,
# which compiles faster with the fusion emitters, asks for them in its
# compile options, tests/e2e/test_train_f0.py). The programs are the same
# HLO, optimised by the same passes; only the machine code differs, and
# with it float rounding (FMA contraction), which every tolerance here
# allows. Set NFNETS_TEST_FULL_OPT=1 to test the machine code users run.
# Subprocesses (CLI tests, the training harness) inherit the flags.
FAST_COMPILE_XLA_FLAGS = (
  '--xla_backend_optimization_level=0',
  '--xla_cpu_use_fusion_emitters=false',
)
if not os.environ.get('NFNETS_TEST_FULL_OPT'):
  os.environ['XLA_FLAGS'] = ' '.join(
    filter(None, [os.environ.get('XLA_FLAGS', ''), *FAST_COMPILE_XLA_FLAGS])
  )


@pytest.fixture(scope='session')
def compilation_cache_dir(tmp_path_factory):
  """One persistent XLA compilation cache for all training runs of a session.

  The training tests compile the same programs (the tiny NFNet's init, train
  and eval steps for a device count and a schedule) several times, in this
  process and in subprocesses of `tests/support/train_harness.py`. Compiling
  dominates their cost, and JAX's cache key is the program and the compiler
  options (`--xla_force_host_platform_device_count` excluded), so every run
  after the first loads the executables from here. pytest-xdist workers
  share the directory (a half-written entry is a cache miss, not an error).
  """
  if os.environ.get('PYTEST_XDIST_WORKER'):
    path = tmp_path_factory.getbasetemp().parent / 'xla_cache'
    path.mkdir(exist_ok=True)
    return str(path)
  return str(tmp_path_factory.mktemp('xla_cache'))


@pytest.fixture(scope='session', autouse=True)
def session_wide_compilation_cache(compilation_cache_dir):
  """Every test, and every process a test starts, shares that cache.

  Test modules build the same small models and steps again and again
  (the tiny NFNet's train step in test_loop, test_grad_accum, test_freeze,
  the CLIs' eval steps), each in its own closure, which JAX's in-memory
  cache does not match. The persistent cache does: on 2 cores it saved
  about 60 s of compilation in the test processes alone. Programs that
  compile in under a second (JAX's default threshold) are not stored.
  Subprocesses inherit `JAX_COMPILATION_CACHE_DIR`. A directory the user
  set is kept.
  """
  import jax

  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  os.environ['JAX_COMPILATION_CACHE_DIR'] = compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', compilation_cache_dir)


# Test modules by their cost on a 2-core machine, longest first (every
# module over ~15 s; the rest follow in collection order). `make test`
# sends whole modules to the two workers in this order (`--dist loadscope
# --no-loadscope-reorder`), so neither worker starts a long module while
# the other runs out of work. Ranked by per-module sums of one run (AMD
# EPYC Zen 3, 2026-12-07, 19 min 51 s). The machine's run-to-run spread is
# larger than what another order changes.
LONGEST_MODULES_FIRST = (
  'test_multidevice.py',
  'test_run_workdir.py',
  'test_nfnet.py',
  'test_loop.py',
  'test_export.py',
  'test_train_f0.py',
  'test_features.py',
  'test_sam.py',
  'test_efficientnet.py',
  'test_freeze.py',
  'test_grad_accum.py',
  'test_train_cli.py',
  'test_notebook.py',
  'test_python_loader.py',
  'test_skipinit_fixup.py',
  'test_checkpoint.py',
  'test_paper_table.py',
  'test_benchmark.py',
  'test_spp.py',
  'test_benchmark_input.py',
  'test_cli_eval_predict.py',
  'test_sweep.py',
  'test_workload.py',
  'test_precision.py',
  'test_fold.py',
  'test_flops.py',
  'test_optim.py',
  'test_batched_init.py',
  'test_device_augment.py',
  'test_step.py',
  'test_layers.py',
  'test_gemm_conv.py',
  'test_device_randaugment.py',
)


def pytest_collection_modifyitems(items):
  """Runs the longest modules first; within a module the order is kept."""
  rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
