"""Building blocks of Normalizer-Free networks (Brock et al., 2021).

Everything here follows DeepMind's reference implementation (`nfnets/base.py`
in `deepmind-research`) to float32 rounding, so released checkpoints apply
unchanged:

* `WSConv2D`: a 2-D convolution with Scaled Weight Standardisation, a
  learnable per-channel gain and an always-present bias. The convolution
  itself is `nfnets.ops.grouped_conv2d`, which picks the form that is fast
  on the backend (natively grouped, or one dense convolution per group plus
  a concat, 5-20x faster to train on XLA:CPU).
* `ACTIVATIONS`: the nonlinearities scaled by the reference's gamma constants
  so that `f(z) * gamma` has unit variance for z ~ N(0, 1).
* `SqueezeExcite`: the 2*sigmoid-gated squeeze-and-excite of the NF models.
* `StochDepth`: per-example stochastic depth (drop a residual branch for some
  examples of the batch) during training.
* `signal_metrics`: the statistics behind signal propagation plots.
"""

from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import ops

# gamma = 1 / std(f(z)) for z ~ N(0, 1); the reference's exact constants.
GAMMAS = {
  'celu': 1.270926833152771,
  'elu': 1.2716004848480225,
  'gelu': 1.7015043497085571,
  'glu': 1.8484294414520264,
  'leaky_relu': 1.70590341091156,
  'log_sigmoid': 1.9193484783172607,
  'log_softmax': 1.0002083778381348,
  'relu': 1.7139588594436646,
  'relu6': 1.7131484746932983,
  'selu': 1.0008515119552612,
  'sigmoid': 4.803835391998291,
  'silu': 1.7881293296813965,
  'soft_sign': 2.338853120803833,
  'softplus': 1.9203323125839233,
  'tanh': 1.5939117670059204,
}

# The unscaled functions. jax.nn.gelu is the tanh approximation by default,
# which is what the reference (and its checkpoints) use.
_BASE_FNS = {
  'celu': jax.nn.celu,
  'elu': jax.nn.elu,
  'gelu': jax.nn.gelu,
  'glu': jax.nn.glu,
  'leaky_relu': jax.nn.leaky_relu,
  'log_sigmoid': jax.nn.log_sigmoid,
  'log_softmax': jax.nn.log_softmax,
  'relu': jax.nn.relu,
  'relu6': jax.nn.relu6,
  'selu': jax.nn.selu,
  'sigmoid': jax.nn.sigmoid,
  'silu': jax.nn.silu,
  'soft_sign': jax.nn.soft_sign,
  'softplus': jax.nn.softplus,
  'tanh': jnp.tanh,
}


def _scaled(fn: Callable, gamma: float) -> Callable:
  """Returns `x -> fn(x) * gamma`, keeping the input dtype."""

  def act(x):
    return fn(x) * jnp.asarray(gamma, dtype=x.dtype)

  act.__name__ = f'scaled_{getattr(fn, "__name__", "fn")}'
  return act


def _identity(x):
  return x


# Registry: name -> variance-preserving activation. 'swish' is an alias of
# 'silu' (the NF-RegNet reference defaults to that name).
ACTIVATIONS = {name: _scaled(_BASE_FNS[name], g) for name, g in GAMMAS.items()}
ACTIVATIONS['swish'] = ACTIVATIONS['silu']
ACTIVATIONS['identity'] = _identity


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up a gamma-scaled activation by name.

  Args:
    name: a key of `ACTIVATIONS` (e.g. 'gelu', 'relu', 'silu').

  Returns:
    The function `x -> f(x) * gamma`.

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.
  """
  if name not in ACTIVATIONS:
    raise ValueError(
      f'Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.'
    )
  return ACTIVATIONS[name]


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
  """Normalises an int or a pair of ints to a tuple of two ints."""
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f'{what} must be an int or a pair of ints, got {value}.')
  return value


def standardize_weight(
  w: jax.Array, gain: jax.Array, eps: float = 1e-4
) -> jax.Array:
  """Scaled Weight Standardisation of an HWIO kernel.

  Per output channel: `(w - mean) * gain / sqrt(max(fan_in * var, eps))`,
  with population mean and variance over the H, W and I axes.

  Args:
    w: kernel of shape (kh, kw, in // groups, out).
    gain: per-output-channel gain, shape (out,).
    eps: lower clamp on `fan_in * var` (the reference's 1e-4).

  Returns:
    The standardised kernel, same shape and dtype as `w`.
  """
  # Statistics on the 2-D view (fan_in, out): the same numbers, but
  # XLA:CPU reduces it several times faster than over axes (0, 1, 2) of the
  # kernel, above all for the 1x1 kernels that hold most of the weights.
  w2d = w.reshape(-1, w.shape[-1])
  fan_in = w2d.shape[0]
  mean = jnp.mean(w2d, axis=0)
  centred = w2d - mean
  var = jnp.mean(jnp.square(centred), axis=0)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return (centred * scale).reshape(w.shape)


class WSConv2D(hk.Module):
  """2-D convolution with Scaled Weight Standardisation (NHWC, HWIO).

  Matches the reference `base.WSConv2D` exactly: kernel `w` of shape
  (kh, kw, in // groups, out) initialised from an untruncated normal with
  std sqrt(1 / fan_in); a per-output-channel `gain` (init 1) and `bias`
  (init 0, always present). The kernel is standardised once per call (see
  `standardize_weight`) and then convolved; the activation's gamma is not
  folded in. Arguments mirror `hk.Conv2D` where they exist.

  For inference, `apply_folded` convolves with a `w` that already holds the
  standardised, gain-scaled kernel (parameters `w` and `bias` only; see
  `nfnets.export`).
  """

  def __init__(
    self,
    output_channels: int,
    kernel_shape: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    rate: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = 'SAME',
    feature_group_count: int = 1,
    w_init: hk.initializers.Initializer | None = None,
    b_init: hk.initializers.Initializer | None = None,
    eps: float = 1e-4,
    grouped_conv: str = 'auto',
    name: str | None = None,
  ):
    """Creates the module.

    Args:
      output_channels: number of output channels.
      kernel_shape: kernel size, an int or (kh, kw).
      stride: stride, an int or (sh, sw).
      rate: kernel dilation, an int or (rh, rw).
      padding: 'SAME' (XLA semantics: for stride 2 on even inputs the extra
        pad goes after), 'VALID', or explicit ((lo, hi), (lo, hi)).
      feature_group_count: number of groups; divides in and out channels.
      w_init: kernel initialiser; default VarianceScaling(1, fan_in, normal).
      b_init: bias initialiser; default zeros.
      eps: clamp on `fan_in * var` in the standardisation.
      grouped_conv: 'auto' | 'split' | 'native' (see
        `nfnets.ops.resolve_grouped_conv`).
      name: Haiku module name.
    """
    super().__init__(name=name)
    if output_channels % feature_group_count:
      raise ValueError(
        f'output_channels={output_channels} is not divisible by '
        f'feature_group_count={feature_group_count}.'
      )
    ops.resolve_grouped_conv(grouped_conv)  # Validates the name early.
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape, 'kernel_shape')
    self.stride = _pair(stride, 'stride')
    self.rate = _pair(rate, 'rate')
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.w_init = w_init or hk.initializers.VarianceScaling(
      1.0, 'fan_in', 'normal'
    )
    self.b_init = b_init or jnp.zeros
    self.eps = eps
    self.grouped_conv = grouped_conv

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(
        f'{self.module_name} expects NHWC input of rank 4, got shape '
        f'{x.shape}; add a batch axis with x[None] for a single image.'
      )
    if x.shape[-1] % self.feature_group_count:
      raise ValueError(
        f'{self.module_name}: {x.shape[-1]} input channels are not divisible '
        f'by feature_group_count={self.feature_group_count}.'
      )

  def _kernel(self, x: jax.Array) -> jax.Array:
    """Checks `x`; returns the kernel parameter `w` for it."""
    self._check_input(x)
    groups = self.feature_group_count
    w_shape = (*self.kernel_shape, x.shape[-1] // groups, self.output_channels)
    return hk.get_parameter('w', w_shape, x.dtype, init=self.w_init)

  def _bias(self, x: jax.Array) -> jax.Array:
    return hk.get_parameter(
      'bias', (self.output_channels,), x.dtype, init=self.b_init
    )

  def _convolve(self, x, kernel, bias, in_loop):
    """`conv(x, kernel) + bias` with the module's geometry and conv mode."""
    y = self._conv(x, kernel.astype(x.dtype), in_loop)
    return y + bias.astype(y.dtype)

  def _conv(self, x, kernel, in_loop):
    """The convolution alone: the operation a precision policy recasts
    (`nfnets.models.precision`)."""
    return ops.grouped_conv2d(
      x,
      kernel,
      stride=self.stride,
      padding=self.padding,
      rate=self.rate,
      groups=self.feature_group_count,
      mode=ops.resolve_grouped_conv(self.grouped_conv),
      in_loop=in_loop,
    )

  def __call__(self, x: jax.Array, *, in_loop: bool = False) -> jax.Array:
    """Applies the convolution to an NHWC batch `x`.

    Args:
      x: input, shape (N, H, W, C).
      in_loop: whether this call is traced inside a loop body (`hk.scan`);
        the op then picks gradients that stay fast there (see
        `nfnets.ops.grouped_conv2d`).

    Returns:
      The convolution output plus bias, shape (N, H', W', out).
    """
    w = self._kernel(x)
    gain = hk.get_parameter(
      'gain', (self.output_channels,), x.dtype, init=jnp.ones
    )
    w_hat = standardize_weight(w, gain, self.eps)
    return self._convolve(x, w_hat, self._bias(x), in_loop)

  def apply_folded(self, x: jax.Array, *, in_loop: bool = False) -> jax.Array:
    """The inference form: `w` is the standardised, gain-scaled kernel.

    Reads only `w` (already `standardize_weight(w, gain, eps)`, as
    `nfnets.export.fold_weight_standardization` computes it) and `bias`,
    and convolves with `w` as it is: no statistics at run time and no
    `gain` parameter, so exporters and runtimes see a plain convolution.
    `nfnets.export.folded_convs` routes every `WSConv2D` call here.

    Args:
      x: input, shape (N, H, W, C).
      in_loop: as in `__call__`.

    Returns:
      The convolution output plus bias, shape (N, H', W', out).
    """
    return self._convolve(x, self._kernel(x), self._bias(x), in_loop)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite as in the NF reference models.

  `x * gate_scale * sigmoid(fc1(act(fc0(mean_hw(x)))))`. The reference uses
  plain (unscaled) ReLU in the hidden layer and gate_scale 2 so that the
  gate is 1 on average at initialisation; both are the defaults. The Linear
  layers are named `linear` (fc0) and `linear_1` (fc1) as in checkpoints.
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    se_ratio: float = 0.5,
    hidden_ch: int | None = None,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    gate_scale: float = 2.0,
    name: str | None = 'squeeze_excite',
  ):
    """Creates the module.

    Args:
      in_ch: channels of the input.
      out_ch: channels of the gate (equal to in_ch in all NF models).
      se_ratio: hidden width as a fraction of in_ch (used if hidden_ch is
        None): hidden = max(1, int(in_ch * se_ratio)).
      hidden_ch: explicit hidden width.
      activation: hidden nonlinearity; the reference uses plain ReLU.
      gate_scale: multiplier of the sigmoid gate (2 in the NF models).
      name: Haiku module name.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.hidden_ch = hidden_ch or max(1, int(in_ch * se_ratio))
    self.activation = activation
    self.gate_scale = gate_scale
    self.fc0 = hk.Linear(self.hidden_ch, with_bias=True)
    self.fc1 = hk.Linear(self.out_ch, with_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns `x` gated per example and channel; `x` is NHWC."""
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(self.activation(self.fc0(h)))
    gate = jax.nn.sigmoid(h) * jnp.asarray(self.gate_scale, h.dtype)
    return x * gate[:, None, None, :]


class StochDepth(hk.Module):
  """Per-example stochastic depth for a residual branch (training only).

  Each example of the batch keeps its branch with probability 1 - drop_rate
  (mask `floor(keep + U[0,1))` of shape [B, 1, 1, 1]). The reference does NOT
  rescale the kept branches by 1/keep (`scale_by_keep=False`, the default
  here); at eval the branch is passed through unchanged, so train and eval
  branch magnitudes differ by the factor keep. Set `scale_by_keep=True` for
  the usual inverted-dropout behaviour.
  """

  def __init__(
    self,
    drop_rate: float,
    scale_by_keep: bool = False,
    name: str | None = 'stoch_depth',
  ):
    """Creates the module.

    Args:
      drop_rate: probability of dropping an example's branch, in [0, 1).
      scale_by_keep: divide kept branches by 1 - drop_rate.
      name: Haiku module name (the module has no parameters).
    """
    super().__init__(name=name)
    if not 0.0 <= drop_rate < 1.0:
      raise ValueError(f'drop_rate must be in [0, 1), got {drop_rate}.')
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep

  def __call__(
    self, x: jax.Array, is_training: bool, *, drop_rate=None
  ) -> jax.Array:
    """Drops whole examples of `x` (any rank >= 1) when training.

    Args:
      x: a batch, examples along the first axis.
      is_training: drop only when True.
      drop_rate: the rate of this call instead of the module's; may be a
        traced scalar (one block applied in a scan over blocks).

    Returns:
      `x` with the dropped examples zeroed.
    """
    rate = self.drop_rate if drop_rate is None else drop_rate
    if not is_training or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    r = jax.random.uniform(hk.next_rng_key(), shape, dtype=x.dtype)
    mask = jnp.floor(keep + r)
    if self.scale_by_keep:
      mask = mask / keep
    return x * mask


def signal_metrics(x: jax.Array, i: int | str) -> dict[str, jax.Array]:
  """Signal-propagation statistics of an NHWC activation.

  Args:
    x: activations, shape (N, H, W, C).
    i: suffix of the metric names (block index; 0 is the stem).

  Returns:
    `avg_sq_mean_{i}`: mean over channels of the squared channel mean;
    `avg_var_{i}`: mean over channels of the channel variance (both over
    N, H, W).
  """
  metrics = {}
  metrics[f'avg_sq_mean_{i}'] = jnp.mean(
    jnp.square(jnp.mean(x, axis=(0, 1, 2)))
  )
  metrics[f'avg_var_{i}'] = jnp.mean(jnp.var(x, axis=(0, 1, 2)))
  return metrics
