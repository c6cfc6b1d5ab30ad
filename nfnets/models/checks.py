"""Argument checks the model constructors and `make_model` share.

Out-of-range hyperparameters otherwise fail far from their cause (width 0:
a ZeroDivisionError inside a conv initialiser; num_classes '1000': a JAX
shape error at init) or are silently accepted (num_classes 0, a dropout
rate of 1.5). These checks run once, on the Python values given to a
constructor, and raise a ValueError that names the argument and its valid
range; they never touch what valid arguments compute.
"""

import math
import numbers
from collections.abc import Mapping

import haiku as hk


def is_positive_int(value) -> bool:
  """Whether `value` is an int >= 1 (numpy ints too; bools are not ints)."""
  return (
    isinstance(value, numbers.Integral)
    and not isinstance(value, bool)
    and value >= 1
  )


def _is_number(value) -> bool:
  """Whether `value` is a real number (not a bool, a string or None)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(model: str, name: str, value) -> None:
  """Raises a ValueError unless `value` is a positive int.

  Args:
    model: the model (or function) for the message.
    name: the argument's name.
    value: its value.
  """
  if not is_positive_int(value):
    raise ValueError(f'{model}: {name} must be a positive int, got {value!r}.')


def check_model_args(
  model: str,
  num_classes=1,
  *,
  width=1.0,
  drop_rate=0.0,
  stochdepth_rate=0.0,
  group_size=1,
  narrowest=None,
  se_ratio=0.5,
  expansion=1.0,
  drop_connect_rate=0.0,
  bn_decay=0.9,
  bn_eps=1e-3,
) -> None:
  """Raises a ValueError naming the first argument out of its valid range.

  The defaults are valid, so a caller passes only the arguments it has.

  Args:
    model: the model's name, for the message.
    num_classes: classifier width, a positive int.
    width: width multiplier, a number > 0.
    drop_rate: dropout rate before the classifier, in [0, 1) (a rate of 1
      would divide by the keep probability 0).
    stochdepth_rate: stochastic-depth schedule's rate, in [0, 1]: block i
      of N (from 0) gets rate * i / N, so 1 still keeps every block with
      some probability, while a rate above 1 would silently turn the
      deepest blocks' stochastic depth off.
    group_size: channels per group of the grouped convs, a positive int.
    narrowest: the smallest channel count `width` multiplies: a width that
      makes `int(narrowest * width)` 0 would leave a layer without
      channels (a ZeroDivisionError deep in weight standardisation).
    se_ratio: squeeze-excite hidden width as a fraction of its input, in
      (0, 1] (a ratio <= 0 would silently give `max(1, int(c * ratio))`,
      one hidden unit).
    expansion: inverted-bottleneck expansion, a number > 0.
    drop_connect_rate: EfficientNet's drop-connect rate, in [0, 1): block
      i of N gets rate * i / N.
    bn_decay: BatchNorm moving-average decay, in [0, 1).
    bn_eps: BatchNorm epsilon, a number > 0.

  Raises:
    ValueError: for a value of the wrong type or out of range.
  """
  check_positive_int(model, 'num_classes', num_classes)
  check_positive_int(model, 'group_size', group_size)
  ranges = (
    ('width', width, lambda v: v > 0, 'a number > 0'),
    ('drop_rate', drop_rate, lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('stochdepth_rate', stochdepth_rate, lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('se_ratio', se_ratio, lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('expansion', expansion, lambda v: v > 0, 'a number > 0'),
    ('drop_connect_rate', drop_connect_rate, lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('bn_decay', bn_decay, lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('bn_eps', bn_eps, lambda v: v > 0, 'a number > 0'),
  )
  for name, value, valid, text in ranges:
    if not (_is_number(value) and valid(value)):
      raise ValueError(f'{model}: {name} must be {text}, got {value!r}.')
  if narrowest is not None and int(narrowest * width) < 1:
    smallest = math.ceil(1e4 / narrowest) / 1e4  # Rounded up: int() is 1.
    raise ValueError(
      f'{model}: width={width!r} leaves its narrowest layer '
      f'(int({narrowest} * width) channels) with none; use width >= '
      f'{smallest:g}.'
    )


def check_depth_coefficient(model: str, depth) -> None:
  """Raises a ValueError unless `depth` is a number > 0.

  EfficientNet's `depth` is its compound-scaling coefficient (each stage's
  repeats times `depth`, rounded up), not the blocks per stage that the
  ResNet-style families take; a value <= 0 would build a network without
  any MBConv block.

  Args:
    model: the model's name, for the message.
    depth: the depth coefficient.
  """
  if not (_is_number(depth) and depth > 0):
    raise ValueError(
      f'{model}: depth is the compound-scaling depth coefficient (stage '
      f'repeats are multiplied by it and rounded up), a number > 0 such as '
      f'1.0 (B0) or 3.1 (B7), got {depth!r}.'
    )


def get_choice(model: str, name: str, value, choices: Mapping):
  """Returns `choices[value]`; the error names the argument and the choices.

  Args:
    model: the model's name, for the message.
    name: the argument's name.
    value: its value, a key of `choices`.
    choices: the registry of valid values.

  Returns:
    The registry's entry for `value`.

  Raises:
    ValueError: for a value not in `choices`; the message lists them.
  """
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
      f'Unknown {model} {name} {value!r}; choose one of {sorted(choices)}.'
    )
  return choices[value]


def check_bn_init(model: str, is_training, test_local_stats) -> None:
  """Raises a ValueError when a BatchNorm model is initialised in eval mode.

  Eval mode reads the moving averages, which only a training-mode call
  creates, so Haiku would fail with "No value for 'average' in
  .../mean_ema, perhaps set an init function?" instead. Does nothing
  outside `init`.

  Args:
    model: the model's name, for the message.
    is_training: the call's training flag.
    test_local_stats: whether eval mode normalises with the batch's own
      statistics (which needs no moving averages).
  """
  if hk.running_init() and not is_training and not test_local_stats:
    raise ValueError(
      f'{model} has BatchNorm: initialise it with is_training=True, which '
      'creates the moving averages in the state that eval mode '
      '(is_training=False) reads; apply may then run in either mode.'
    )
