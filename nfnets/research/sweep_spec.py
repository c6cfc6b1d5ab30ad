"""What a sweep is: the `Sweep` of a sweep file, its grid and point configs.

A sweep file is a Python file with `get_sweep()` returning a `Sweep`: a base
config file plus an ordered grid of dotted config keys and their values.
`Sweep` checks its own shape when it is made (axes of (key, list or tuple),
`plot_metric` among `metrics`), `expand` gives the grid's points (refusing
repeated values and points that would share a workdir), and `point_configs`
their full configs, checked as the trainer checks them, so a mistake in the
sweep file is a one-line error before any point trains. `nfnets.research.
sweep` runs them.
"""

import copy
import dataclasses
import importlib.util
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


def _frozen(value: Any) -> Any:
  """`value` with its lists made tuples (hashable, as a config keeps them)."""
  if isinstance(value, list | tuple):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, Mapping):
    return {k: _frozen(v) for k, v in value.items()}
  return value


def _checked_axes(name: str, axes) -> tuple:
  """The axes as ((key, (values...)), ...), or a ValueError saying why not."""
  if isinstance(axes, str) or not isinstance(axes, Sequence):
    raise ValueError(
      f'Sweep {name!r}: axes must be a tuple of (dotted key, values) pairs, '
      f'got {axes!r}.'
    )
  checked = []
  for axis in axes:
    if not (
      isinstance(axis, Sequence)
      and not isinstance(axis, str)
      and len(axis) == 2
      and isinstance(axis[0], str)
    ):
      raise ValueError(
        f'Sweep {name!r}: axis {axis!r} is not a (dotted key, values) pair; '
        "write e.g. ('optimizer.lr', (0.1, 0.2))."
      )
    key, values = axis
    if not isinstance(values, list | tuple):
      raise ValueError(
        f'Sweep axis {key!r}: its values must be a list or tuple, got '
        f'{type(values).__name__} {values!r}; write ({values!r},) for one '
        'value.'
      )
    checked.append((key, _frozen(values)))
  return tuple(checked)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A grid of config overrides on top of a base config file.

  Attributes:
    name: short name, used in titles.
    base_config: path of a config file, optionally with ':arg' (as for
      `--config`), relative to the working directory.
    axes: ordered (dotted key, values) pairs; the grid is their product.
      Values are a list or tuple; list values (a `depth`, say) are kept as
      tuples.
    overrides: dotted key -> value applied to every point first.
    metrics: metric names to collect (keys of the `TrainResult.metrics`,
      e.g. 'eval/top1', 'train/loss').
    plot_metric: metric of the Markdown pivot table and the plot; one of
      `metrics` (default: the first).
    labels: optional display names of axis values: key -> {value: label}
      (e.g. clipping 0.0 -> 'none').

  Raises:
    ValueError: for axes or metrics of the wrong shape (a string where a
      tuple belongs, a `plot_metric` not in `metrics`).
  """

  name: str
  base_config: str
  axes: Sequence[tuple[str, Sequence[Any]]]
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  metrics: Sequence[str] = ('eval/top1', 'train/loss')
  plot_metric: str | None = None
  labels: Mapping[str, Mapping[Any, str]] = dataclasses.field(
    default_factory=dict
  )

  def __post_init__(self):
    object.__setattr__(self, 'axes', _checked_axes(self.name, self.axes))
    metrics = self.metrics
    if (
      isinstance(metrics, str)
      or not metrics
      or not all(isinstance(m, str) for m in metrics)
    ):
      raise ValueError(
        f'Sweep {self.name!r}: metrics must be a tuple of metric names, got '
        f"{metrics!r}; write e.g. ('eval/top1',)."
      )
    object.__setattr__(self, 'metrics', tuple(metrics))
    if self.plot_metric is None and self.metrics:
      object.__setattr__(self, 'plot_metric', self.metrics[0])
    if self.plot_metric not in self.metrics:
      raise ValueError(
        f'Sweep {self.name!r}: plot_metric {self.plot_metric!r} is not one '
        f'of its metrics {self.metrics}; add it to metrics or plot one of '
        'them.'
      )


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: its directory name and its overrides (axis order)."""

  name: str
  overrides: dict[str, Any]


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file {path!r} does not exist.')
  module_name = '_sweep_' + re.sub(r'\W', '_', os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> Sweep:
  """Imports a sweep file and returns its `get_sweep()`.

  Args:
    path: path of a Python file defining `get_sweep() -> Sweep`.

  Returns:
    The `Sweep`.
  """
  module = _load_module(path, 'Sweep')
  if not hasattr(module, 'get_sweep'):
    raise ValueError(
      f'{path} defines no get_sweep(); see nfnets/research/sweep.py.'
    )
  sweep = module.get_sweep()
  if not sweep.axes:
    raise ValueError(f'Sweep {sweep.name!r} has no axes.')
  return sweep


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` the way `--config=path[:arg]` does.

  Args:
    spec: config file path, optionally followed by ':arg'.

  Returns:
    The file's `get_config(arg)` (or `get_config()` without an arg).
  """
  path, _, arg = spec.partition(':')
  module = _load_module(path, 'Config')
  return module.get_config(arg) if arg else module.get_config()


def format_value(value: Any) -> str:
  """An axis value as point names and tables show it.

  A float shows as `%g` where that reads back as the same number (0.01,
  1e-05), else in full (0.3000001 is not 0.3): distinct values, distinct
  names.
  """
  if isinstance(value, float):
    short = f'{value:g}'
    return short if float(short) == value else repr(value)
  if isinstance(value, list | tuple):
    return 'x'.join(format_value(v) for v in value)
  return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """A directory-safe name, e.g. 'clipping=0.01,batch_size=64'.

  Args:
    overrides: dotted key -> value, in axis order.

  Returns:
    Each key's last component (the full key where two last components
    coincide) with its value, joined by commas.
  """
  last = [key.rsplit('.', 1)[-1] for key in overrides]
  parts = [
    f'{short if last.count(short) == 1 else key}={format_value(value)}'
    for short, (key, value) in zip(last, overrides.items(), strict=True)
  ]
  return re.sub(r'[^\w.,=+-]', '_', ','.join(parts))


def _check_distinct(key: str, values: Sequence[Any]) -> None:
  for i, value in enumerate(values):
    if any(value == earlier for earlier in values[:i]):
      raise ValueError(
        f'Sweep axis {key!r} repeats the value {value!r}: give each value '
        'once (a point is trained once).'
      )


def expand(sweep: Sweep) -> list[Point]:
  """The grid's points, the last axis varying fastest.

  Args:
    sweep: the sweep.

  Returns:
    One `Point` per combination of axis values.

  Raises:
    ValueError: for an axis without values or with a value twice, a key
      on two axes, or two points whose names (their workdirs) coincide.
  """
  keys = [key for key, _ in sweep.axes]
  values = [list(vals) for _, vals in sweep.axes]
  for key, vals in zip(keys, values, strict=True):
    if not vals:
      raise ValueError(f'Sweep axis {key!r} has no values.')
    _check_distinct(key, vals)
  if len(set(keys)) != len(keys):
    raise ValueError(f'Sweep axes repeat a key: {keys}.')
  points, by_name = [], {}
  for combo in itertools.product(*values):
    overrides = dict(zip(keys, combo, strict=True))
    point = Point(point_name(overrides), overrides)
    if point.name in by_name:
      raise ValueError(
        f'Sweep points {by_name[point.name]} and {overrides} would share the '
        f'workdir {point.name!r}: make the values differ in letters, digits '
        "or '.,=+-'."
      )
    by_name[point.name] = overrides
    points.append(point)
  return points


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set, like `--config.a.b=value`.

  Args:
    config: the base config (not modified).
    overrides: dotted key -> value; every key must already exist.

  Returns:
    The new config.

  Raises:
    ValueError: for a key the config does not have (listing the valid
      ones): a mistake in the sweep file, reported before any point trains.
  """
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = config
    for i, part in enumerate([*parents, leaf]):
      group = isinstance(node, ml_collections.ConfigDict)
      if not group or part not in node:
        raise ValueError(
          f'Sweep key {dotted!r}: {".".join(parents[:i]) or "the config"} '
          f'has no {part!r}; valid keys there: {sorted(node) if group else []}'
          '. Fix the key in the sweep file.'
        )
      if i < len(parents):
        node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:  # ConfigDict's type check: 'a' for an int.
      raise ValueError(f'Sweep key {dotted!r}: {e}') from e
  return config


def check_config(name: str, config: ml_collections.ConfigDict) -> None:
  """Checks a point's config as the trainer would, before anything runs.

  `nfnets.train.config.validate_config` (the loop's and data's settings)
  and `nfnets.optim.config.validate` (the optimizer's): an unknown
  optimizer name fails here, not as a failed point or a launched job.

  Raises:
    ValueError: naming the point and the setting.
  """
  from nfnets.optim import config as optim_config  # noqa: PLC0415
  from nfnets.train import config as train_config  # noqa: PLC0415

  try:
    train_config.validate_config(config)
    optim_config.validate(config.optimizer)
  except ValueError as e:
    raise ValueError(f'Sweep point {name}: {e}') from e


def point_configs(
  sweep: Sweep, base: ml_collections.ConfigDict | None = None
) -> list[tuple[Point, ml_collections.ConfigDict]]:
  """Every point with its full config (checks all points before any run).

  Args:
    sweep: the sweep.
    base: the base config; loaded from `sweep.base_config` when None.

  Returns:
    (point, config) pairs.

  Raises:
    ValueError: for a key the config lacks or a value the trainer would
      refuse (`check_config`), naming the point.
  """
  base = load_config(sweep.base_config) if base is None else base
  base = apply_overrides(base, sweep.overrides)
  configured = [(p, apply_overrides(base, p.overrides)) for p in expand(sweep)]
  for point, config in configured:
    check_config(point.name, config)
  return configured


def label(sweep: Sweep, key: str, value: Any) -> str:
  """How tables and plots show an axis value (`Sweep.labels` or the value)."""
  try:
    return sweep.labels.get(key, {}).get(value, format_value(value))
  except TypeError:  # A dict value: no label can name it.
    return format_value(value)
