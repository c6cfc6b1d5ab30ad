"""One sweep point: its training, its saved result, and its workdir's checks.

`run_point` trains a point unless `<workdir>/sweep_result.json` holds a
finished result ('ok' or 'diverged'); a 'failed' one is retried.
`check_point_unchanged` refuses a point whose workdir holds a run of
another config: for a sweep point every key that can change its result
counts (`SWEEP_SAFE_KEYS` lists the few that cannot), stricter than the
trainer's resume rules, which let a resumed run change its length, its
evaluation and its initial weights. A failed point whose config changed is
retried: in place when only its evaluation changed (the run resumes and
evaluates again), else from scratch, its earlier files moved to
`<workdir>/failed_attempt_<k>/` (`set_aside_failed_run`).
"""

import contextlib
import json
import os
import re
import time
import traceback
from collections.abc import Callable

RESULT_FILE = 'sweep_result.json'
ERROR_LOG = 'sweep_error.log'
STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = 'ok', 'diverged', 'failed'
SET_ASIDE_PREFIX = 'failed_attempt_'

# Keys (or sections, ending in '.') that leave a point's result alone: how
# often it logs and checkpoints, where its data and caches live, how it is
# spread over hosts. Any other difference makes it another point.
SWEEP_SAFE_KEYS = (
  'train.log_every_steps',
  'train.compilation_cache_dir',
  'train.distributed.',
  'checkpoint.',
  'data.data_dir',
  'data.num_threads',
  'data.cache',
)
# What only the evaluation reads: a failed point whose config changes only
# these resumes from its checkpoints and evaluates again.
EVAL_ONLY_KEYS = (
  'eval.',
  'data.eval_image_size',
  'data.eval_split',
  'data.eval_preproc',
)


def _matches(key: str, patterns) -> bool:
  return any(
    key == p or (p.endswith('.') and key.startswith(p)) for p in patterns
  )


def read_result(workdir: str) -> dict | None:
  """A point's saved result, None without one; unreadable counts as failed."""
  path = os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    return {'status': STATUS_FAILED, 'error': f'{path} cannot be read: {e}'}


def config_changes(config, workdir: str) -> tuple[list[str], list[str]]:
  """How `config` differs from the run in `workdir`, as a sweep point.

  Returns:
    (lines, keys): `old -> new` lines and the dotted keys of every
    difference outside `SWEEP_SAFE_KEYS`; empty for a workdir without a
    run. A key the saved config lacks, at its library default, is no
    change (the library added it since).
  """
  from nfnets.train import provenance, resume_rules  # noqa: PLC0415

  saved = provenance.previous_config(workdir, log=lambda _: None)
  if saved is None:
    return [], []
  keys = [
    k
    for k in resume_rules.changed_keys(saved, config)
    if not _matches(k, SWEEP_SAFE_KEYS)
  ]
  # Every safe key here is resume-safe too: `also` makes the rest count.
  lines = resume_rules.unsafe_changes(saved, config, also=keys)
  counted = [k for k in keys if any(line.startswith(f'{k}:') for line in lines)]
  return lines, counted


def check_point_unchanged(config, workdir: str) -> None:
  """Refuses a point whose workdir holds a run of another config.

  The point names encode only the axis values, so after an edit of the
  sweep file (its base config or fixed overrides) a rerun would skip the
  finished points and tabulate their old results as the new sweep's.

  Raises:
    ValueError: naming the differences and what to do.
  """
  changed, _ = config_changes(config, workdir)
  if changed:
    listed = ''.join(f'\n  {line}' for line in changed[:10])
    raise ValueError(
      f'{workdir} holds a run of another config than this sweep gives '
      f'it:{listed}\nThe sweep file changed since that run: run it with '
      'another --outdir (the results there stay as they are), or undo the '
      'change.'
    )


def set_aside_failed_run(config, workdir: str, log=print) -> str | None:
  """Before retrying a failed point: moves a run of another config aside.

  The trainer would refuse to resume it (or resume it under the new
  config); nothing is deleted: the files go to a new
  `<workdir>/failed_attempt_<k>/`. A change of the evaluation alone keeps
  the run, which resumes and evaluates again.

  Returns:
    The folder the files went to, or None when nothing moved.
  """
  _, keys = config_changes(config, workdir)
  if all(_matches(k, EVAL_ONLY_KEYS) for k in keys):
    return None
  from nfnets.train import workdir_lock  # noqa: PLC0415

  names = sorted(os.listdir(workdir))
  k = 1
  while f'{SET_ASIDE_PREFIX}{k}' in names:
    k += 1
  folder = os.path.join(workdir, f'{SET_ASIDE_PREFIX}{k}')
  os.makedirs(folder)
  for name in names:
    if not name.startswith(SET_ASIDE_PREFIX) and name != workdir_lock.LOCK_FILE:
      os.replace(os.path.join(workdir, name), os.path.join(folder, name))
  log(f'  its config changed ({", ".join(keys)}): its files are in {folder}')
  return folder


def logged_train_metrics(workdir: str) -> dict:
  """The last train record of `<workdir>/metrics.jsonl` (without 'step').

  A run resumed at its final step trains no step, so its `TrainResult`
  holds only the (logged) final eval; its train metrics are the ones the
  run logged at that step, as the trainer reads back its eval.
  """
  from nfnets.train import writers  # noqa: PLC0415

  path = os.path.join(workdir, writers.METRICS_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    lines = f.read().splitlines()
  for line in reversed(lines):
    try:
      record = json.loads(line)
    except ValueError:
      continue  # A line cut by a kill.
    if isinstance(record, dict) and any(k.startswith('train/') for k in record):
      return {k: float(v) for k, v in record.items() if k.startswith('train/')}
  return {}


def with_train_metrics(result: dict, workdir: str) -> dict:
  """`result` with the logged train metrics where it has none (see above)."""
  metrics = result.get('metrics', {})
  if result.get('status') != STATUS_OK or any(
    k.startswith('train/') for k in metrics
  ):
    return result
  return {**result, 'metrics': {**logged_train_metrics(workdir), **metrics}}


def _forget_failure(workdir: str) -> None:
  for stale in (RESULT_FILE, ERROR_LOG):  # If interrupted now, not done.
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, stale))


def run_point(config, workdir: str, train_fn: Callable, log=print) -> dict:
  """Trains one point unless its workdir already holds a finished result.

  A 'failed' result is retried (the user reran after fixing the cause);
  a run of another config in its workdir is first moved aside
  (`set_aside_failed_run`).

  Args:
    config: the point's full config.
    workdir: the point's workdir.
    train_fn: `(config, workdir) -> TrainResult`, normally
      `nfnets.train.train_and_evaluate`.
    log: progress printer.

  Returns:
    dict(status, metrics, seconds[, error]), also saved to
    `<workdir>/sweep_result.json`; a failure's traceback goes to
    `<workdir>/sweep_error.log`. 'seconds' is the time of this call's
    training only (see docs/research.md).
  """
  previous = read_result(workdir)
  if previous is not None:
    if previous.get('status') != STATUS_FAILED:
      log(f'  already done ({os.path.join(workdir, RESULT_FILE)}); skipping')
      return with_train_metrics(previous, workdir)
    log(f'  retrying; it failed last time: {previous.get("error", "?")}')
    if set_aside_failed_run(config, workdir, log) is None:
      _forget_failure(workdir)
  result = _train(config, workdir, train_fn, log)
  from nfnets.train import provenance  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  provenance.write_json(os.path.join(workdir, RESULT_FILE), result)
  return result


def _train(config, workdir: str, train_fn: Callable, log) -> dict:
  """Runs `train_fn`; a divergence or a failure is a result too."""
  from nfnets.train import NonFiniteLossError  # noqa: PLC0415

  t0 = time.perf_counter()
  result = dict(status=STATUS_OK, metrics={})
  try:
    out = train_fn(config, workdir)
    if out.preempted:
      raise KeyboardInterrupt('Run preempted; rerun the sweep to continue.')
    result['metrics'] = {k: float(v) for k, v in out.metrics.items()}
    result = with_train_metrics(result, workdir)
  except NonFiniteLossError as e:
    result.update(status=STATUS_DIVERGED, error=str(e))
    step = re.search(r'at step (\d+)', str(e))
    if step:
      result['diverged_step'] = int(step.group(1))
  except (ValueError, RuntimeError, OSError) as e:
    # One line says all about a missing folder; a bug needs the traceback.
    result.update(status=STATUS_FAILED, error=f'{type(e).__name__}: {e}')
    error_log = os.path.join(workdir, ERROR_LOG)
    os.makedirs(workdir, exist_ok=True)
    with open(error_log, 'w') as f:
      f.write(traceback.format_exc())
    log(f'  {result["error"].strip()}\n  (traceback in {error_log})')
  result['seconds'] = time.perf_counter() - t0
  return result
