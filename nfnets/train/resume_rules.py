"""The resume rules: which config changes a resumed run may make.

Resuming a run with a config that changes how it trains (model, data,
optimizer, batch, schedule, seed, ...) is refused (`check_resume`) unless
the caller allows it; the keys in `RESUME_SAFE_KEYS` (the run length, the
logging, eval and checkpoint cadence, where the data lives, how the run is
spread over hosts) may change freely. `nfnets.train.provenance` applies
these rules to a workdir's records.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

import ml_collections

from nfnets.train import config_json

_ABSENT = '(absent)'

# Keys (or whole sections, ending in '.') that do not change what a run
# computes: its length, its logging, eval and checkpoint cadence, where its
# data and caches live, how it is spread over hosts and micro-batches, and
# the initial weights (only read at step 0).
RESUME_SAFE_KEYS = (
  'train.num_steps',
  'train.num_epochs',
  'train.log_every_steps',
  'train.compilation_cache_dir',
  'train.grad_accum_steps',
  'train.distributed.',
  'eval.',
  'checkpoint.',
  'data.data_dir',
  'data.num_threads',
  'data.cache',
  'data.eval_image_size',
  'data.eval_split',
  'data.eval_preproc',
  'model.init_from',
  'model.batched_init',
)


class ConfigChangeError(ValueError):
  """Resuming a run with a config that changes how it trains."""


def _flatten(config, prefix: str = '') -> dict:
  """`{dotted key: value}` of a ConfigDict or mapping (lists as tuples)."""
  flat = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = config_json.as_tuple(value)
  return flat


def _show(value) -> str:
  return _ABSENT if value is _ABSENT else repr(value)


def changed_keys(old, new) -> list[str]:
  """The dotted keys whose values differ between two configs, sorted.

  Args:
    old: a ConfigDict or nested mapping.
    new: a ConfigDict or nested mapping.
  """
  a, b = _flatten(old), _flatten(new)
  keys = sorted(set(a) | set(b))
  return [k for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def config_differences(old, new) -> list[str]:
  """One line per differing key: `optimizer.lr: 0.1 -> 0.3`.

  Lists and tuples compare equal, so a config read back from JSON matches
  the one it was written from; a key present on one side only shows as
  '(absent)' on the other.

  Args:
    old: a ConfigDict or nested mapping.
    new: a ConfigDict or nested mapping.

  Returns:
    The lines, sorted by key; empty when the configs agree.
  """
  a, b = _flatten(old), _flatten(new)
  return [
    f'{k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}'
    for k in changed_keys(old, new)
  ]


def is_resume_safe(key: str) -> bool:
  """Whether changing `key` on resume leaves what the run computes alone."""
  return any(
    key == safe or (safe.endswith('.') and key.startswith(safe))
    for safe in RESUME_SAFE_KEYS
  )


def library_defaults() -> dict:
  """`{dotted key: default}` of every config group the library defines.

  A key missing from a run's saved config was added to the library after
  the run started; at its default it reproduces the earlier behaviour (new
  keys default to what the code did before them), so resuming with it is
  no change.
  """
  # Imported here: the readers above stay free of JAX and TensorFlow.
  from nfnets import data, models, optim  # noqa: PLC0415
  from nfnets.train import config as train_config  # noqa: PLC0415

  groups = {
    'model': models.default_config(),
    'data': data.default_config(),
    'optimizer': optim.default_config(),
    'train': train_config.default_train_config(),
    'eval': train_config.default_eval_config(),
    'checkpoint': train_config.default_checkpoint_config(),
    'distributed': train_config.default_distributed_config(),
  }
  return _flatten(groups)


def _newly_defined_at_default(key: str, old: dict, new: dict, defaults) -> bool:
  return key not in old and key in defaults and new.get(key) == defaults[key]


def _micro_batch_keys(flat: dict) -> tuple[str, ...]:
  """Resume-safe keys that change this run's training after all.

  `train.grad_accum_steps` gives the same update unless the micro-batches
  are seen apart: a BatchNorm model normalises each alone, and SAM with
  its ascent on part of the rows or per replica (`nfnets.train.sam`)
  takes replicas of one micro-batch's rows.
  """
  from nfnets import models  # noqa: PLC0415  (the readers stay JAX-free)

  kwargs = {
    key.removeprefix('model.kwargs.'): value
    for key, value in flat.items()
    if key.startswith('model.kwargs.')
  }
  name = flat.get('model.name', '')
  sam_by_replica = flat.get('optimizer.sam_rho', 0) and (
    flat.get('optimizer.sam_ascent_fraction', 1.0) != 1
    or not flat.get('optimizer.sam_ascent_sync', True)
  )
  if models.keeps_batch_statistics(name, kwargs) or sam_by_replica:
    return ('train.grad_accum_steps',)
  return ()


def unsafe_changes(old, new, *, defaults=None, also=()) -> list[str]:
  """The `config_differences` lines of the keys a resume may not change.

  Args:
    old: the config of the run's latest segment.
    new: the config of the segment about to start.
    defaults: `{dotted key: default}`; a key absent from `old` and at its
      default in `new` is no change (default: `library_defaults()`).
    also: keys to count as changes even where a resume allows them.
  """
  lines = dict(
    zip(changed_keys(old, new), config_differences(old, new), strict=True)
  )
  return [lines[k] for k in _unsafe_keys(old, new, defaults, also)]


def _unsafe_keys(old, new, defaults, also=()) -> list[str]:
  """The changed keys a resume may not change (see `unsafe_changes`)."""
  defaults = library_defaults() if defaults is None else defaults
  flat_old, flat_new = _flatten(old), _flatten(new)
  also = (*also, *_micro_batch_keys(flat_new))
  return [
    key
    for key in changed_keys(old, new)
    if (key in also or not is_resume_safe(key))
    and not _newly_defined_at_default(key, flat_old, flat_new, defaults)
  ]


def _restore_hint(old, new, keys, defaults) -> str:
  """How to give `keys` the run's values: shell-quoted `--config.K=V` flags.

  A key the run's config lacks takes its library default. A value no flag
  can set (None) is left to the user, and the hint says so.
  """
  defaults = library_defaults() if defaults is None else defaults
  flat_old = _flatten(old)
  base = new if isinstance(new, ml_collections.ConfigDict) else None
  flags, missing = [], False
  for key in keys:
    value = flat_old.get(key, defaults.get(key))
    if value is None or base is None:
      missing = True
      continue
    text = config_json.flag_text(base, key, value)
    flags.append(shlex.quote(f'--config.{key}={text}'))
  if not flags:
    return ''
  others = ' and the others as listed' if missing else ''
  return f' ({" ".join(flags)}{others})'


def check_resume(
  old, new, *, step: int, allow_change: bool, defaults=None
) -> list[str]:
  """Checks a resume's config against the run's; returns the differences.

  Args:
    old: the config of the run's latest segment.
    new: the config of the segment about to start.
    step: the step the run resumes from (for the message).
    allow_change: accept changes outside `RESUME_SAFE_KEYS` too.
    defaults: `{dotted key: default}`; a key absent from `old` and at its
      default in `new` is no change (default: `library_defaults()`).

  Returns:
    `config_differences(old, new)`.

  Raises:
    ConfigChangeError: listing every difference that changes how the run
      trains, when `allow_change` is False.
  """
  lines = config_differences(old, new)
  unsafe = unsafe_changes(old, new, defaults=defaults)
  if unsafe and not allow_change:
    listed = '\n'.join(f'  {line}' for line in unsafe)
    back = _restore_hint(old, new, _unsafe_keys(old, new, defaults), defaults)
    raise ConfigChangeError(
      f'This workdir holds a run at step {step} trained with another config; '
      f'resuming it would change how it trains:\n{listed}\n'
      f"Use a fresh --workdir, give those keys the run's values{back}, or "
      'pass --allow_config_change to resume with the change (it is recorded '
      "in the workdir's configs/)."
    )
  return lines
