"""Backend-specific implementations of the operations the models use.

The model layer (`nfnets.models`) calls these; they know nothing of models.
`conv` picks the grouped-convolution form that is fast on the backend and
`im2col` holds the XLA:CPU-friendly dense convolution with custom gradients.
"""

from nfnets.ops.conv import (
  GROUPED_CONV_MODES,
  IM2COL_GRAD_MIN_POSITIONS,
  grouped_conv2d,
  resolve_grouped_conv,
)
from nfnets.ops.im2col import conv2d_im2col_grad

__all__ = [
  'GROUPED_CONV_MODES',
  'IM2COL_GRAD_MIN_POSITIONS',
  'conv2d_im2col_grad',
  'grouped_conv2d',
  'resolve_grouped_conv',
]
