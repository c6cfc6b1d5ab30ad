"""Host-memory settings that make XLA:CPU training steps faster on Linux.

XLA:CPU allocates one temporary buffer per execution for all activations
(1.9 GB for an NFNet-F0 train step at batch 8, 192 px) and frees it at the
end. glibc's malloc serves a block that large with `mmap` and returns it with
`munmap`, so every step the kernel maps and zeroes ~470,000 fresh 4 KiB
pages: measured 1.3-1.9 CPU-s of page faults per F0 step on a 2-core
machine (docs/performance.md). The fix is to keep freed memory in the
process: one malloc arena (the worker threads would otherwise `mmap` large
blocks from their own arenas whatever the settings), no `mmap` for large
blocks, and no trimming of the heap, so the next step's buffer reuses the
same, already-mapped pages.

The cost: the process keeps its peak heap (its RSS does not shrink after a
large step), which a training process reaches on its first step anyway.
`mallopt` settings only apply to threads that have not yet created their own
arena, so call `keep_freed_memory()` first thing in a program, before JAX
starts its CPU backend (a notebook whose backend is already running gets
part of the gain). The same settings from outside the program, for any
process: `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:`
`glibc.malloc.trim_threshold=68719476736` (one string, no space).
"""

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


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
  return all(mallopt(param, value) == 1 for param, value in settings)
