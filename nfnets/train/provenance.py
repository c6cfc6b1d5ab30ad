"""A run's configs: every segment's config kept in the workdir, resume rules.

A run is trained in one or more segments: each call of `train_and_evaluate`
on a workdir that trains steps is one segment, starting at the step of the
checkpoint it resumes from (0 for a fresh run). The workdir keeps:

  config.json                         the latest segment's full config
  configs/segment_NNN_step_S.json     one record per segment: its index, the
                                      step it starts at, the time, the device
                                      count, its config, the type information
                                      that turns that JSON back into the
                                      ConfigDict, and the keys it changed

`load_run_config(workdir)` reads the latest config back into a ConfigDict
like the one training used (tuples, typed `None` placeholders, nested
sections), for `experiments.evaluate` and `experiments.predict`.

Resuming with a config that changes how the run trains (model, data,
optimizer, batch, schedule, seed, ...) is refused (`check_resume`) unless
the caller allows it; the keys in `RESUME_SAFE_KEYS` (the run length, the
logging, eval and checkpoint cadence, where the data lives, how the run is
spread over hosts) may change freely. Either way the change is recorded in
the new segment's record.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

CONFIG_FILE = 'config.json'
SEGMENTS_DIR = 'configs'
_SEGMENT_RE = re.compile(r'^segment_(\d+)_step_(\d+)\.json$')
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


# Reading and writing configs.


def _type_info(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """`{dotted key: type}` for the leaves JSON does not describe alone.

  Tuples become JSON lists, and a typed placeholder (a `FieldReference`,
  e.g. `config_dict.placeholder(int)`) becomes a bare value or null, so
  both are recorded: 'tuple', or 'ref:<type name>' for a reference.
  """
  types = {}
  for key in config.keys():
    path = prefix + key
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      types.update(_type_info(value, path + '.'))
      continue
    # `_fields` is the only way to tell a placeholder from a plain value.
    field = config._fields[key]  # noqa: SLF001
    if isinstance(field, config_dict.FieldReference):
      types[path] = 'ref:' + field.get_type().__name__
    elif isinstance(value, tuple):
      types[path] = 'tuple'
  return types


_REF_TYPES = {t.__name__: t for t in (int, float, str, bool, tuple, list)}


def _as_tuple(value):
  if isinstance(value, list):
    return tuple(_as_tuple(v) for v in value)
  return value


def _typed(plain: Mapping, types: Mapping, prefix: str = ''):
  """The ConfigDict of JSON `plain`, with tuples and placeholders typed."""
  config = ml_collections.ConfigDict()
  for key, value in plain.items():
    path = prefix + key
    kind = types.get(path)
    if isinstance(value, Mapping):
      value = _typed(value, types, path + '.')
    elif kind == 'tuple' or (kind == 'ref:tuple' and value is not None):
      value = _as_tuple(value)
    elif kind is None and isinstance(value, list):
      value = _as_tuple(value)  # Configs hold tuples (hashable for jit).
    if kind and kind.startswith('ref:') and kind[4:] in _REF_TYPES:
      value = config_dict.FieldReference(value, field_type=_REF_TYPES[kind[4:]])
    config[key] = value
  return config


def config_record(config: ml_collections.ConfigDict) -> dict:
  """`{'config': JSON-able dict, 'types': ...}`: what `config_from_record`
  turns back into `config`.

  Args:
    config: a run's config.

  Returns:
    The plain config (as written to config.json) and its type information.
  """
  plain = json.loads(config.to_json_best_effort(sort_keys=True))
  return {'config': plain, 'types': _type_info(config)}


def config_from_record(record: Mapping) -> ml_collections.ConfigDict:
  """The locked ConfigDict of a `config_record` (or a plain config dict).

  Args:
    record: `{'config': ..., 'types': ...}`, or a plain config dict (as in
      config.json), whose lists are then read as tuples.

  Returns:
    A locked ConfigDict.
  """
  if 'config' in record and 'types' in record:
    plain, types = record['config'], record['types']
  else:
    plain, types = record, {}
  config = _typed(plain, types)
  config.lock()
  return config


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def segment_records(workdir: str) -> list[tuple[str, dict]]:
  """The run's segment records, oldest first, as (path, record).

  Unreadable records are skipped (a run killed while writing one).

  Args:
    workdir: the run's workdir.
  """
  directory = os.path.join(workdir, SEGMENTS_DIR)
  if not os.path.isdir(directory):
    return []
  found = []
  for name in os.listdir(directory):
    match = _SEGMENT_RE.match(name)
    if match:
      found.append((int(match.group(1)), os.path.join(directory, name)))
  records = []
  for _, path in sorted(found):
    try:
      records.append((path, _read_json(path)))
    except (OSError, ValueError):
      continue
  return records


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The locked config of the run's latest segment, as training used it.

  Reads `<workdir>/config.json` (the latest segment's full config) and
  types it with the latest segment record's type information: tuples stay
  tuples and `None` placeholders keep their type, so command-line style
  overrides apply as they would to the config file (lists read as tuples
  without records). A segment record copied over config.json restores it.

  Args:
    workdir: a training run's workdir.

  Raises:
    FileNotFoundError: when the workdir has no config.json.
    ValueError: when config.json is not valid JSON or not a JSON object.
  """
  workdir = os.path.expanduser(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{path!r} does not exist: pass the --workdir of a training run '
      '(it writes config.json when it starts).'
    )
  try:
    plain = _read_json(path)
  except ValueError as e:
    raise ValueError(f'{path!r} is not valid JSON: {e}') from e
  records = segment_records(workdir)
  types = records[-1][1].get('types', {}) if records else {}
  if isinstance(plain, dict) and 'config' in plain and 'types' in plain:
    plain, types = plain['config'], plain['types']  # A record copied back.
  if not isinstance(plain, dict) or not plain:
    raise ValueError(f'{path!r} is not a run config (not a JSON object).')
  return config_from_record({'config': plain, 'types': types})


# Comparing configs.


def _flatten(config, prefix: str = '') -> dict:
  """`{dotted key: value}` of a ConfigDict or mapping (lists as tuples)."""
  flat = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = _as_tuple(value)
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
  keys = changed_keys(old, new)
  defaults = library_defaults() if defaults is None else defaults
  flat_old, flat_new = _flatten(old), _flatten(new)
  unsafe = [
    ln
    for k, ln in zip(keys, lines, strict=True)
    if not is_resume_safe(k)
    and not _newly_defined_at_default(k, flat_old, flat_new, defaults)
  ]
  if unsafe and not allow_change:
    listed = '\n'.join(f'  {line}' for line in unsafe)
    raise ConfigChangeError(
      f'This workdir holds a run at step {step} trained with another config; '
      f'resuming it would change how it trains:\n{listed}\n'
      'Use a fresh --workdir, drop those overrides, or pass '
      '--allow_config_change to resume with the change (it is recorded in '
      f"the workdir's {SEGMENTS_DIR}/)."
    )
  return lines


def write_segment(
  workdir: str,
  config: ml_collections.ConfigDict,
  *,
  start_step: int,
  changes: list[str],
  num_devices: int,
) -> str:
  """Records a new segment and makes its config the workdir's config.json.

  Args:
    workdir: the run's workdir (created if missing).
    config: the segment's config.
    start_step: the step the segment starts from.
    changes: `config_differences` against the previous segment.
    num_devices: the device count the segment runs on.

  Returns:
    The path of the segment record.
  """
  directory = os.path.join(workdir, SEGMENTS_DIR)
  os.makedirs(directory, exist_ok=True)
  records = segment_records(workdir)
  index = 0
  if records:
    last = _SEGMENT_RE.match(os.path.basename(records[-1][0]))
    index = int(last.group(1)) + 1
  record = {
    'segment': index,
    'start_step': int(start_step),
    'started': datetime.datetime.now(datetime.UTC).isoformat(
      timespec='seconds'
    ),
    'num_devices': int(num_devices),
    'changes': list(changes),
  }
  record.update(config_record(config))
  path = os.path.join(directory, f'segment_{index:03d}_step_{start_step}.json')
  _write_json(path, record)
  _write_json(os.path.join(workdir, CONFIG_FILE), record['config'])
  return path


def _write_json(path: str, value) -> None:
  """Writes JSON through a temporary file, so a reader never sees half."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def previous_config(
  workdir: str, log=print
) -> ml_collections.ConfigDict | None:
  """The config of the workdir's latest segment, or None for a new run.

  Args:
    workdir: the run's workdir.
    log: prints a warning when config.json cannot be read (the run then
      proceeds as if it had none; the new segment records its config).
  """
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return None
  try:
    return load_run_config(workdir)
  except (OSError, ValueError, TypeError, KeyError) as e:
    log(f"Warning: cannot compare with the run's saved config: {e}")
    return None


def resume_changes(
  config, workdir: str, *, latest_step: int | None, allow_change: bool
) -> list[str]:
  """How `config` differs from the run's; refuses changes a resume forbids.

  Args:
    config: the config of the segment about to start.
    workdir: the run's workdir.
    latest_step: the step of its newest checkpoint (None: nothing to
      resume, so any change is a fresh start and allowed).
    allow_change: passed to `check_resume`.

  Returns:
    `config_differences` from the latest segment's config ([] for a new
    run).

  Raises:
    ConfigChangeError: see `check_resume`.
  """
  previous = previous_config(workdir)
  if previous is None:
    return []
  if latest_step is None:
    return config_differences(previous, config)
  return check_resume(
    previous, config, step=latest_step, allow_change=allow_change
  )


def start_segment(
  workdir: str,
  config,
  *,
  start_step: int,
  total_steps: int,
  changes: list[str],
  num_devices: int,
  log=print,
) -> None:
  """What a segment does to the workdir first (process 0 only).

  Moves the metrics.jsonl records after `start_step` aside (the steps are
  trained again; `writers.set_aside_records_after`) and records the
  segment (`write_segment`), except for a finished run rerun with the same
  config, which records nothing.

  Args:
    workdir: the run's workdir.
    config: the segment's config.
    start_step: the step the segment starts from (the restored one).
    total_steps: the step the run ends at.
    changes: `resume_changes`' result.
    num_devices: the device count the segment runs on.
    log: prints a line.
  """
  # Imported here: the config readers above need no JAX (writers does).
  from nfnets.train import writers  # noqa: PLC0415

  moved = writers.set_aside_records_after(workdir, start_step)
  if moved:
    log(
      f'Moved {moved} metrics.jsonl record(s) of steps after {start_step}, '
      f'which are trained again, to {writers.ABANDONED_METRICS_FILE}.'
    )
  if changes:
    listed = ''.join(f'\n  {line}' for line in changes)
    log(f"Config changes from the run's last segment:{listed}")
  first = not segment_records(workdir)
  if first or changes or start_step < total_steps:
    write_segment(
      workdir,
      config,
      start_step=start_step,
      changes=changes,
      num_devices=num_devices,
    )
