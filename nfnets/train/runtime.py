"""Process-wide runtime setup for training, incl. host memory for XLA:CPU.

Two roles:

* `setup_runtime(config.train)`, which the trainer calls before anything
  touches a JAX backend: the host-memory settings below (on the CPU
  backend only), `jax.distributed.initialize` for multi-host runs, and the
  persistent compilation cache.
* Host-memory settings that make XLA:CPU training steps faster on Linux
  (`keep_freed_memory`, `keep_freed_memory_on_cpu`), also used by the
  benchmarks.

Why the host-memory settings: XLA:CPU allocates one temporary buffer per
execution for all activations (1.9 GB for an NFNet-F0 train step at batch 8,
192 px) and frees it at the end. glibc's malloc serves a block that large
with `mmap` and returns it with `munmap`, so every step the kernel maps and
zeroes ~470,000 fresh 4 KiB pages: measured 1.3-1.9 CPU-s of page faults per
F0 step on a 2-core machine (docs/performance.md). The fix is to keep freed
memory in the process: one malloc arena (the worker threads would otherwise
`mmap` large blocks from their own arenas whatever the settings), no `mmap`
for large blocks, and no trimming of the heap, so the next step's buffer
reuses the same, already-mapped pages.

The cost: the process keeps its peak heap (its RSS does not shrink after a
large step), which a training process reaches on its first step anyway.
`mallopt` settings only apply to threads that have not yet created their own
arena, so call `keep_freed_memory()` first thing in a program, before JAX
starts its CPU backend (a notebook whose backend is already running gets
part of the gain). The same settings from outside the program, for any
process: `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:`
`glibc.malloc.trim_threshold=68719476736` (one string, no space).

On GPU/TPU the activations live in device memory, so the settings buy
nothing there, while one arena serialises the mallocs of every host thread
(XLA's parallel compiler and autotuner, tf.data's decoders). Programs
therefore call `keep_freed_memory_on_cpu()`, which applies them only when
JAX is expected to run on its CPU backend.
"""

import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

# Device nodes of the accelerators JAX has plugins for: NVIDIA and AMD GPUs,
# and TPUs (v4 and older as accel*, newer ones through VFIO).
_ACCELERATOR_NODES = ('nvidiactl', 'kfd', 'accel[0-9]*', 'vfio/[0-9]*')

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_state = {'applied': False}


def keep_freed_memory() -> bool:
  """Tells glibc malloc to keep freed memory mapped for reuse.

  Returns:
    True if the settings were applied; False where they do not apply (not
    Linux, not glibc), which is harmless: only speed differs.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs: no mallopt.
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_MAX, 0),
    (_M_TRIM_THRESHOLD, -1),  # -1: never give the heap top back.
  )
  _state['applied'] = all(mallopt(p, value) == 1 for p, value in settings)
  return _state['applied']


def settings_applied() -> bool:
  """Whether this process called `keep_freed_memory` with success.

  Benchmarks record it: the settings change both step and compile times.
  """
  return _state['applied']


def accelerator_expected(dev_dir: str = '/dev') -> bool:
  """Whether JAX will pick a GPU/TPU backend, judged before it starts one.

  The malloc settings must come before JAX's first backend starts, so this
  reads what JAX will decide from: `jax_platforms` (`JAX_PLATFORMS`) when
  set, else whether an accelerator plugin is installed and its device is
  present (a plugin alone falls back to the CPU). Importing jax is fine:
  backends start on first use.

  Args:
    dev_dir: where device nodes live (a parameter for tests).
  """
  import jax  # noqa: PLC0415  (only its config; no backend starts)

  platforms = (jax.config.jax_platforms or '').strip()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return _accelerator_plugin_installed() and any(
    glob.glob(os.path.join(dev_dir, node)) for node in _ACCELERATOR_NODES
  )


def _accelerator_plugin_installed() -> bool:
  """Whether JAX can find a GPU/TPU plugin (the ways JAX looks for them)."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins  # noqa: PLC0415  (a namespace package, if any)
  except ImportError:
    return False
  return any(pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory_on_cpu() -> bool:
  """`keep_freed_memory()` unless JAX is expected on an accelerator.

  Returns:
    True if the settings were applied.
  """
  return not accelerator_expected() and keep_freed_memory()


def setup_runtime(train_config) -> None:
  """Initialises multi-host JAX, the compilation cache and host malloc.

  Must run before anything touches a JAX backend. All settings are
  process-wide; an already-initialised distributed runtime or an explicitly
  configured cache directory (e.g. `JAX_COMPILATION_CACHE_DIR`) is kept.
  `keep_freed_memory_on_cpu` saves XLA:CPU from re-faulting its per-step
  buffers (1-2 CPU-s per NFNet-F0 step on 2 cores); it leaves malloc alone
  when JAX is expected on a GPU/TPU.

  Args:
    train_config: `config.train`.
  """
  import jax  # noqa: PLC0415  (on use, as in `accelerator_expected`)

  keep_freed_memory_on_cpu()
  dist = train_config.distributed
  if dist.enabled and not jax.distributed.is_initialized():
    # jax has no cross-process collectives on CPU unless one is chosen.
    jax.config.update(
      'jax_cpu_collectives_implementation', dist.cpu_collectives
    )
    kwargs = {}
    if dist.coordinator_address:
      kwargs['coordinator_address'] = dist.coordinator_address
    if dist.num_processes > 0:
      kwargs['num_processes'] = dist.num_processes
    if dist.process_id >= 0:
      kwargs['process_id'] = dist.process_id
    jax.distributed.initialize(**kwargs)
  cache_dir = train_config.compilation_cache_dir
  if cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update(
      'jax_compilation_cache_dir', os.path.expanduser(cache_dir)
    )
