"""A run's configs: every segment's config kept in the workdir, resume rules.

A run is trained in one or more segments: each call of `train_and_evaluate`
on a workdir that trains steps is one segment, starting at the step of the
checkpoint it resumes from (0 for a fresh run). The workdir keeps:

  config.json                         the latest segment's full config
  configs/segment_NNN_step_S.json     one record per segment: its index, the
                                      step it starts at, the time, the device
                                      count, its config, the type information
                                      that turns that JSON back into the
                                      ConfigDict, the keys it changed and
                                      what its settings at 'auto' chose

`load_run_config(workdir)` reads the latest config back into a ConfigDict
like the one training used (tuples, typed `None` placeholders, nested
sections), for `experiments.evaluate` and `experiments.predict`.

A resume is checked against the latest record by `resume_rules` (a change
of how the run trains is refused unless allowed); either way the change is
recorded in the new segment's record.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping

import ml_collections

from nfnets import atomic_files
from nfnets.train import config_json, resume_rules

CONFIG_FILE = 'config.json'
SEGMENTS_DIR = 'configs'
_SEGMENT_RE = re.compile(r'^segment_(\d+)_step_(\d+)\.json$')
AUTO_CHOICES = 'auto_choices'  # A segment record's key.


# Reading and writing configs.


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
  return config_json.config_from_record({'config': plain, 'types': types})


def write_segment(
  workdir: str,
  config: ml_collections.ConfigDict,
  *,
  start_step: int,
  changes: list[str],
  num_devices: int,
  auto_choices=None,
) -> str:
  """Records a new segment and makes its config the workdir's config.json.

  Args:
    workdir: the run's workdir (created if missing).
    config: the segment's config.
    start_step: the step the segment starts from.
    changes: `config_differences` against the previous segment.
    num_devices: the device count the segment runs on.
    auto_choices: what the settings at 'auto' chose (`resume_changes`).

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
    AUTO_CHOICES: dict(auto_choices or {}),
  }
  record.update(config_json.config_record(config))
  path = os.path.join(directory, f'segment_{index:03d}_step_{start_step}.json')
  write_json(path, record)
  write_json(os.path.join(workdir, CONFIG_FILE), record['config'])
  return path


def write_json(path: str, value) -> None:
  """Writes a record whole, keys sorted (`atomic_files.write_json`)."""
  atomic_files.write_json(path, value, sort_keys=True)


def previous_config(
  workdir: str, log=print
) -> ml_collections.ConfigDict | None:
  """The config of the workdir's latest segment, or None for a new run.

  Args:
    workdir: the run's workdir.
    log: prints a warning when config.json is missing or cannot be read:
      the latest segment record stands in for it, and without one the run
      proceeds as if it had none (the new segment records its config).
  """
  saved = os.path.join(workdir, CONFIG_FILE)
  problem = f'{saved} is missing'
  if os.path.isfile(saved):
    try:
      return load_run_config(workdir)
    except (OSError, ValueError, TypeError, KeyError) as e:
      problem = str(e).rstrip('.')
  for path, record in reversed(segment_records(workdir)):
    try:
      config = config_json.config_from_record(record)
    except (ValueError, TypeError, KeyError, AttributeError):
      continue
    log(f'Warning: {problem}. Comparing with the segment record {path}.')
    return config
  if os.path.isfile(saved):
    log(f"Warning: cannot compare with the run's saved config: {problem}.")
  return None


def resume_changes(
  config,
  workdir: str,
  *,
  latest_step: int | None,
  allow_change: bool,
  auto_choices=None,
) -> list[str]:
  """How `config` differs from the run's; refuses changes a resume forbids.

  Settings left at 'auto' compare as what they chose: the latest segment
  records its choices (`write_segment`), so a resume on a host that would
  choose another recipe is refused like a change of the setting, and one
  that pins the recorded choice is no change.

  Args:
    config: the config of the segment about to start.
    workdir: the run's workdir.
    latest_step: the step of its newest checkpoint (None: nothing to
      resume, so any change is a fresh start and allowed).
    allow_change: passed to `resume_rules.check_resume`.
    auto_choices: `{dotted key: value}` made of the settings at 'auto'
      (default: this host's, `nfnets.data.auto_choices`).

  Returns:
    `config_differences` from the latest segment's config ([] for a new
    run).

  Raises:
    resume_rules.ConfigChangeError: see `resume_rules.check_resume`.
  """
  previous = previous_config(workdir)
  if previous is None:
    return []
  records = segment_records(workdir)
  chosen = records[-1][1].get(AUTO_CHOICES, {}) if records else {}
  previous = _as_chosen(previous, chosen)
  # 'auto' here compares as its choice where the run's side is known: its
  # recorded choice or a value it pinned (a run recorded without choices
  # keeps 'auto' against 'auto').
  now = {
    key: value
    for key, value in _this_hosts(config, auto_choices).items()
    if _setting(previous, key) != 'auto'
  }
  config = _as_chosen(config, now)
  if latest_step is None:
    return resume_rules.config_differences(previous, config)
  try:
    return resume_rules.check_resume(
      previous, config, step=latest_step, allow_change=allow_change
    )
  except resume_rules.ConfigChangeError as e:
    pins = [
      f'--config.{key}={_setting(previous, key)}'
      for key, value in now.items()
      if value != _setting(previous, key)
    ]
    if not pins:
      raise
    raise resume_rules.ConfigChangeError(
      f"{e}\nSettings at 'auto' chose otherwise on this host than when the "
      f"run trained; to keep the run's recipe, pin them: {' '.join(pins)}."
    ) from None


def _this_hosts(config, auto_choices):
  """`auto_choices`, or by default what this host makes of 'auto'."""
  if auto_choices is not None:
    return auto_choices
  from nfnets import data  # noqa: PLC0415  (the readers stay JAX-free)

  return data.auto_choices(config.data)


def _setting(plain: Mapping, key: str):
  """The value of dotted `key` ('data.loader') in a nested dict."""
  section, name = key.split('.')
  return plain.get(section, {}).get(name)


def _as_chosen(config, choices: Mapping) -> dict:
  """`config` as a nested dict, its settings at 'auto' as `choices` says."""
  plain = config_json.config_record(config)['config']
  for key, value in choices.items():
    section, name = key.split('.')
    if plain.get(section, {}).get(name) == 'auto':
      plain[section][name] = value
  return plain


def start_segment(
  workdir: str,
  config,
  *,
  start_step: int,
  total_steps: int,
  changes: list[str],
  num_devices: int,
  auto_choices=None,
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
    auto_choices: what the settings at 'auto' chose (default: this
      host's, as in `resume_changes`).
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
      auto_choices=_this_hosts(config, auto_choices),
    )
