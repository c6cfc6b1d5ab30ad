"""Loading pretrained NFNet weights, checked against the model they are for.

`load(path, variant=...)` reads any weights file `read_params` understands
and compares every parameter name and shape with the chosen variant,
reporting all mismatches at once. `merge_pretrained` initialises a model for
fine-tuning from pretrained params, re-initialising a classifier whose
number of classes differs. `PRETRAINED` lists DeepMind's released weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import numpy as np

from nfnets.models import nfnet, registry
from nfnets.pretrained.errors import PretrainedMismatchError
from nfnets.pretrained.formats import flatten_params, read_params
from nfnets.pretrained.safe_pickle import Params

# Public URLs of DeepMind's released weights (F6 was trained with SAM) and the
# top-1 / top-5 ImageNet accuracy their README reports at test resolution.
PRETRAINED = {
  f'F{n}': dict(
    url=f'https://storage.googleapis.com/dm-nfnets/F{n}_haiku.npz',
    top1=top1,
    top5=top5,
  )
  for n, (top1, top5) in enumerate(
    [
      (83.6, 96.8),
      (84.7, 97.1),
      (85.1, 97.3),
      (85.7, 97.5),
      (85.9, 97.6),
      (86.0, 97.6),
      (86.5, 97.9),
    ]
  )
}

# Module that holds the classifier in DeepMind's naming.
CLASSIFIER_MODULE = 'NFNet/~/linear'


def check_model_kwargs(model_kwargs: Mapping, what: str = 'model_kwargs'):
  """Raises a ValueError naming the keys `nfnet.NFNet` does not take.

  A misspelt key (`widht`) would otherwise surface as a TypeError from deep
  inside the model's construction, after the weights were read.

  Args:
    model_kwargs: NFNet constructor kwargs (without variant, num_classes).
    what: where they come from, for the message.

  Raises:
    ValueError: naming the unknown keys and the valid ones.
  """
  # The variant is passed on its own (the classifier width is read from the
  # weights, and the module name fixes the parameter names).
  valid = [k for k in registry.constructor_kwargs('NFNet') if k != 'variant']
  unknown = sorted(set(model_kwargs) - set(valid))
  if not unknown:
    return
  hint = ''
  if 'variant' in unknown:
    hint += ' Pass the variant on its own (--variant).'
  if 'num_classes' in unknown:
    hint += ' The number of classes is read from the weights.'
  raise ValueError(
    f'{what} has {", ".join(map(repr, unknown))}, which NFNet does not '
    f'take; its keys are {", ".join(valid)}.{hint}'
  )


def expected_shapes(
  variant: str = 'F0', num_classes: int = 1000, **model_kwargs
) -> dict[str, dict[str, tuple[int, ...]]]:
  """Parameter shapes of `nfnet.NFNet(num_classes, variant, **model_kwargs)`.

  Args:
    variant: a key of `nfnets.VARIANTS` (e.g. 'F0').
    num_classes: classifier width.
    **model_kwargs: further `NFNet` constructor arguments (e.g. `width`).

  Returns:
    `{module: {name: shape}}`, computed abstractly (no weights allocated).

  Raises:
    ValueError: an unknown variant or model kwarg.
  """
  if variant not in nfnet.VARIANTS:
    raise ValueError(
      f'Unknown variant {variant!r}; valid: {sorted(nfnet.VARIANTS)}.'
    )
  check_model_kwargs(model_kwargs)

  def forward(x):
    net = nfnet.NFNet(num_classes=num_classes, variant=variant, **model_kwargs)
    return net(x, is_training=False)

  model = hk.transform(forward)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  # A concrete key: its shape depends on the configured PRNG implementation.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return {
    m: {n: tuple(v.shape) for n, v in leaves.items()}
    for m, leaves in shapes.items()
  }


def find_mismatches(
  params: Mapping[str, Mapping[str, Any]],
  expected: Mapping[str, Mapping[str, tuple[int, ...]]],
) -> list[str]:
  """Lists every missing, unexpected or wrongly shaped parameter.

  Args:
    params: the params to check.
    expected: `{module: {name: shape}}`, e.g. from `expected_shapes`.

  Returns:
    One human-readable line per problem; empty when everything matches.
  """
  got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
  want = {
    f'{m}/{n}': tuple(s)
    for m, leaves in expected.items()
    for n, s in leaves.items()
  }
  problems = [f'missing: {k} {want[k]}' for k in sorted(want.keys() - got)]
  problems += [f'unexpected: {k} {got[k]}' for k in sorted(got.keys() - want)]
  problems += [
    f'shape: {k} is {got[k]}, model expects {want[k]}'
    for k in sorted(want.keys() & got.keys())
    if got[k] != want[k]
  ]
  return problems


# A mismatch report lists this many problems, then counts the rest: a wrong
# variant differs in hundreds of parameters, and the first few say which.
MAX_LISTED_PROBLEMS = 8


def format_problems(problems: list[str], limit: int = MAX_LISTED_PROBLEMS):
  """The first `limit` problems, one per indented line, then the count left.

  Args:
    problems: lines from `find_mismatches`.
    limit: how many to list.

  Returns:
    A string starting with a newline (empty for no problems).
  """
  lines = list(problems[:limit])
  if len(problems) > limit:
    lines.append(f'... and {len(problems) - limit} more')
  return ''.join(f'\n  {line}' for line in lines)


def check_params(
  params: Mapping[str, Mapping[str, Any]],
  expected: Mapping[str, Mapping[str, tuple[int, ...]]],
  *,
  what: str = 'weights',
  hint: str = '',
) -> None:
  """Raises if any name or shape differs, listing every problem.

  Args:
    params: the params to check.
    expected: `{module: {name: shape}}` of the model.
    what: description of the weights for the error message.
    hint: extra advice appended to the message.

  Raises:
    PretrainedMismatchError: when `find_mismatches` reports anything.
  """
  problems = find_mismatches(params, expected)
  if problems:
    raise PretrainedMismatchError(
      f'{what}: {len(problems)} problems.{hint}' + format_problems(problems)
    )


def _infer_num_classes(params: Params) -> int:
  bias = params.get(CLASSIFIER_MODULE, {}).get('b')
  return 1000 if bias is None else int(np.shape(bias)[0])


def _items(kwargs: Mapping, keys) -> str:
  """`k=v, ...` of `keys` in JSON ('unset' where missing)."""
  return ', '.join(
    f'{k}={json.dumps(kwargs[k]) if k in kwargs else "unset"}' for k in keys
  )


def _mismatch_hint(metadata: Mapping, variant: str, model_kwargs: Mapping):
  """What to pass instead: widths and depths differ as much as variants."""
  hint = ''
  file_variant = metadata.get('variant')
  if file_variant and file_variant != variant:
    hint += f' The file says it holds variant {file_variant!r}.'
  if 'model_kwargs' in metadata:
    recorded = json.loads(metadata['model_kwargs'])
    # Through JSON, as recorded: a depth tuple equals the list it is saved as.
    wanted = json.loads(json.dumps(dict(model_kwargs), default=str))
    differ = sorted(
      k for k in recorded.keys() | wanted.keys()
      if recorded.get(k, ...) != wanted.get(k, ...)
    )  # fmt: skip
    if differ:
      hint += f' The file records model_kwargs {_items(recorded, differ)} '
      hint += f'where the model has {_items(wanted, differ)}.'
  return hint + (
    ' Pass the variant and the model kwargs the weights were trained with '
    '(--variant, --model_kwargs=\'{"width": ...}\'; a file written by '
    'convert_weights records them).'
  )


def load(
  path: str | os.PathLike,
  variant: str = 'F0',
  *,
  num_classes: int | None = None,
  check: bool = True,
  **model_kwargs,
) -> Params:
  """Loads NFNet weights from any supported file and checks them.

  Args:
    path: DeepMind `F*_haiku.npz` pickle, our `.safetensors`/`.npz`, or a
      timm `dm_nfnet_*` safetensors file.
    variant: the NFNet variant the weights are for (e.g. 'F0').
    num_classes: classifier width; inferred from the file when None.
    check: compare every name and shape with the model (recommended).
    **model_kwargs: further `NFNet` constructor arguments (e.g. `width`).

  Returns:
    Haiku params `{module: {name: float32 np.ndarray}}`.

  Raises:
    ValueError: an unknown variant or model kwarg, before reading the file.
    PretrainedMismatchError: listing every mismatch, when `check` finds any.
  """
  if check:
    check_model_kwargs(model_kwargs)
  params, metadata = read_params(path)
  if num_classes is None:
    num_classes = _infer_num_classes(params)
  if check:
    check_params(
      params,
      expected_shapes(variant, num_classes, **model_kwargs),
      what=f'{os.fspath(path)!r} for NFNet variant {variant!r} with '
      f'{num_classes} classes',
      hint=_mismatch_hint(metadata, variant, model_kwargs),
    )
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def merge_pretrained(
  init_params: Mapping[str, Mapping[str, Any]],
  pretrained: Mapping[str, Mapping[str, Any]],
  *,
  reinit_modules: tuple[str, ...] = (CLASSIFIER_MODULE,),
) -> Params:
  """Initialises a model for fine-tuning from pretrained params.

  Every parameter is taken from `pretrained`, except those of
  `reinit_modules` whose shapes differ (a classifier for a different number
  of classes), which keep their fresh initialisation.

  Args:
    init_params: freshly initialised params of the model to fine-tune.
    pretrained: pretrained params (e.g. from `load(..., check=False)`).
    reinit_modules: modules that may be replaced when their shapes differ.

  Returns:
    Params with the structure and dtypes of `init_params`.

  Raises:
    PretrainedMismatchError: any other name or shape mismatch, all listed.
  """
  expected = {
    m: {n: np.shape(v) for n, v in leaves.items()}
    for m, leaves in init_params.items()
  }
  replaced = [
    m
    for m in reinit_modules
    if m in expected
    and find_mismatches({m: pretrained.get(m, {})}, {m: expected[m]})
  ]
  problems = find_mismatches(
    {m: v for m, v in pretrained.items() if m not in replaced},
    {m: v for m, v in expected.items() if m not in replaced},
  )
  if problems:
    raise PretrainedMismatchError(
      'Pretrained weights do not fit the model being fine-tuned (use the '
      f'same variant and width): {len(problems)} problems.'
      + format_problems(problems)
      + '\n  Re-initialised where their shapes differ (reinit_modules, '
      f'config.model.reinit_modules): {", ".join(reinit_modules) or "none"}.'
    )
  return {
    m: {
      n: v if m in replaced else np.asarray(pretrained[m][n], v.dtype)
      for n, v in leaves.items()
    }
    for m, leaves in init_params.items()
  }
