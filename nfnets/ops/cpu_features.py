"""The host CPU's model and vector/matrix extensions, and what they imply.

`cpu_conv_plan` runs 1x1 convolutions as float32-accumulated GEMMs with a
custom gradient (`nfnets.ops.matmul_f32acc`) on x86 CPUs with AVX2 or
AVX-512. Its kernel gradient is computed transposed, the orientation
XLA:CPU's GEMM runs fastest, where the gradient autodiff gives `jnp.dot`
spends more in copies and element-wise kernels; with AMX its bfloat16
operands also reach the tile units (~765 GFLOP/s on a 2-core Intel Xeon,
against ~320 in float32), which XLA's convolutions never do. Measured in
float32 (docs/performance.md): F0's step 2% faster on an AMX Xeon and 6-8%
on Zen 4, NF-ResNet-50's 15-20% and BN-ResNet-50's 32-38% on Zen 4; on
Zen 4 with XLA's code generation held to AVX2 (`--xla_cpu_max_isa=AVX2`),
F0 within run-to-run noise and BN-ResNet-50 27% faster. Larger kernels
keep XLA's convolutions everywhere: at F0's 3x3 shapes the GEMM form of
their gradients (`nfnets.ops.conv2d_gemm`, selectable below) measured
slower. CPUs without AVX2 (and non-x86 CPUs, whose flags are not read)
take the portable path.

Override: the environment variable `NFNETS_CPU_CONV` ('gemm': every form
a GEMM; 'gemm_1x1': the 1x1 GEMMs only; 'xla': none, the portable path)
forces the choice on any CPU; unset or 'auto', the flags decide. The
flags are read from /proc/cpuinfo once per process (cached on first
use, nothing happens at import).
"""

import dataclasses
import functools
import os

# The flags a benchmark result records and the dispatch looks at.
RELEVANT_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')
CPU_CONV_ENV = 'NFNETS_CPU_CONV'
CPU_CONV_IMPLS = ('auto', 'gemm', 'gemm_1x1', 'xla')
_CPUINFO = '/proc/cpuinfo'


def _cpuinfo_field(name: str) -> str:
  """The value of the first `name : value` line of /proc/cpuinfo, or ''."""
  try:
    with open(_CPUINFO) as f:
      for line in f:
        key, sep, value = line.partition(':')
        if sep and key.strip() == name:
          return value.strip()
  except OSError:  # Not Linux: no flags, so the portable path is taken.
    pass
  return ''


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
  """The host CPU's feature flags (/proc/cpuinfo `flags`), read once.

  Returns:
    The flags, e.g. {'avx2', 'avx512f', 'amx_bf16', ...}; empty where
    /proc/cpuinfo is not available.
  """
  return frozenset(_cpuinfo_field('flags').split())


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
  """The host CPU's model name (/proc/cpuinfo `model name`), or ''."""
  return _cpuinfo_field('model name')


def cpu_class(flags: frozenset[str] | set[str]) -> str:
  """Classifies a CPU by the extensions its convolution speed depends on.

  Args:
    flags: CPU feature flags, as `cpu_flags` returns them.

  Returns:
    'amx' (AMX bfloat16 tiles and AVX-512), 'avx512' (AVX-512 without AMX),
    'avx2', or 'other'.
  """
  if 'amx_bf16' in flags and 'avx512f' in flags:
    return 'amx'
  if 'avx512f' in flags:
    return 'avx512'
  if 'avx2' in flags:
    return 'avx2'
  return 'other'


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """Which convolutions run as float32-accumulated GEMMs on XLA:CPU.

  Attributes:
    matmul_1x1: 1x1 convolutions as `nfnets.ops.matmul_f32acc` (its kernel
      gradient is computed transposed, the faster GEMM orientation).
    gemm_grads: the gradients of larger undilated kernels as GEMMs
      (`nfnets.ops.conv2d_gemm`).
  """

  matmul_1x1: bool
  gemm_grads: bool


def cpu_conv_plan(
  flags: frozenset[str] | set[str] | None = None,
  override: str | None = None,
) -> ConvPlan:
  """The XLA:CPU convolution forms on this (or a given) CPU.

  Args:
    flags: CPU feature flags; None reads this host's (`cpu_flags`).
    override: 'auto', 'gemm' (every form a GEMM), 'gemm_1x1' (the 1x1
      GEMMs only) or 'xla' (none: XLA's convolutions and `jnp.dot`, the
      portable path); None reads `NFNETS_CPU_CONV` from the environment
      (unset = 'auto').

  Returns:
    On AVX2 and AVX-512 CPUs, 1x1 convolutions as GEMMs (in every dtype:
    up to 2.4x faster forward + backward at F0's shapes on AMX, in
    bfloat16 on the AMX units); on other CPUs, and for the larger kernels'
    gradients on every CPU, XLA's forms (the GEMM form measured
    1.0-2.0x slower at F0's 3x3 shapes, its im2col/col2im copies costing
    more than the faster GEMM saves). The plan is the same in float32 and
    bfloat16.

  Raises:
    ValueError: for an unknown override; the message lists the valid ones.
  """
  if override is None:
    override = os.environ.get(CPU_CONV_ENV, '') or 'auto'
  if override not in CPU_CONV_IMPLS:
    raise ValueError(
      f'Unknown {CPU_CONV_ENV}={override!r}; choose one of {CPU_CONV_IMPLS}.'
    )
  if override != 'auto':
    return ConvPlan(override.startswith('gemm'), override == 'gemm')
  flags = cpu_flags() if flags is None else flags
  x86_simd = cpu_class(flags) in ('amx', 'avx512', 'avx2')
  return ConvPlan(matmul_1x1=x86_simd, gemm_grads=False)


def cpu_summary() -> dict[str, object]:
  """The CPU model and its relevant flags, for benchmark records.

  Returns:
    {'cpu_model': name, 'cpu_flags': {flag: present} for
    `RELEVANT_FLAGS`, 'cpu_class': `cpu_class`, 'cpu_conv': the
    `cpu_conv_plan` as a dict}.
  """
  flags = cpu_flags()
  return {
    'cpu_model': cpu_model(),
    'cpu_flags': {flag: flag in flags for flag in RELEVANT_FLAGS},
    'cpu_class': cpu_class(flags),
    'cpu_conv': dataclasses.asdict(cpu_conv_plan(flags)),
  }
