"""Backend-specific implementations of the operations the models use.

The model layer (`nfnets.models`) calls these; they know nothing of models.
`conv` picks the grouped-convolution form that is fast on the backend,
`depthwise` the depthwise-convolution form, and `im2col` holds the
XLA:CPU-friendly dense convolution with custom gradients. `gemm_conv`
writes convolutions and their gradients as float32-accumulated GEMMs (the
fast form of 1x1 convolutions on x86 CPUs), and `cpu_features`
reads the host CPU's extensions that choose between the two; `dispatch`
maps a mode ('auto', the CPU form, 'native') to the backend's
implementation.
"""

from nfnets.ops.conv import (
  GROUPED_CONV_MODES,
  IM2COL_GRAD_MIN_POSITIONS,
  grouped_conv2d,
  resolve_grouped_conv,
)
from nfnets.ops.cpu_features import (
  CPU_CONV_ENV,
  ConvPlan,
  cpu_conv_plan,
  cpu_summary,
)
from nfnets.ops.depthwise import (
  DEPTHWISE_CONV_MODES,
  depthwise_conv2d,
  resolve_depthwise_conv,
)
from nfnets.ops.gemm_conv import conv2d_gemm, matmul_f32acc
from nfnets.ops.im2col import conv2d_im2col_grad

__all__ = [
  'CPU_CONV_ENV',
  'ConvPlan',
  'DEPTHWISE_CONV_MODES',
  'GROUPED_CONV_MODES',
  'IM2COL_GRAD_MIN_POSITIONS',
  'conv2d_gemm',
  'conv2d_im2col_grad',
  'cpu_conv_plan',
  'cpu_summary',
  'depthwise_conv2d',
  'grouped_conv2d',
  'matmul_f32acc',
  'resolve_depthwise_conv',
  'resolve_grouped_conv',
]
