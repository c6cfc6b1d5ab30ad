"""What every command-line entry point shares: a quiet start, short errors.

`run(main)` replaces `absl.app.run(main)`. It starts quietly
(`quiet_start`: TensorFlow's and gRPC's log levels, and TensorFlow's
start-up notices dropped and its Keras preload skipped whenever something
first imports it, so that only commands that use TensorFlow import it),
and after flag parsing it lowers absl's Python logging to WARNING unless
`--verbosity` is given (JAX logs "Unable to initialize backend 'tpu'" at
INFO on every machine without a TPU).

User errors become a short message on stderr instead of a traceback: bad
flags, bad `--config.*` overrides and config or usage errors (`ValueError`)
exit with status 2; missing files and other runtime failures (`OSError`,
a non-finite loss) with status 1. `NFNETS_TRACEBACK=1` in the environment
lets every error propagate with its full traceback.

`define_config_flag` with `run(main, prepare=use_run_config)` lets `--config`
default to the config a training run saved in its workdir
(`<workdir>/config.json`), so `evaluate --workdir=W` and `predict
--workdir=W` need nothing else; `--config.x=v` overrides apply on top of it.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import quiet_start

TRACEBACK_ENV = 'NFNETS_TRACEBACK'
USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPT_EXIT = 130

RUN_CONFIG_FILE = 'config.json'


def exit_code(error: BaseException) -> int | None:
  """The exit status for a user error, or None for a bug (show traceback).

  Args:
    error: the exception that ended the command.

  Returns:
    2 for usage and config errors, 1 for runtime failures, 130 for Ctrl-C,
    None for anything else. An error class may set its own `exit_status`
    (a damaged checkpoint is a ValueError, but a runtime failure).
  """
  status = getattr(type(error), 'exit_status', None)
  if isinstance(status, int):
    return status
  if isinstance(error, app.UsageError | flags.Error | ValueError):
    return USAGE_EXIT
  if isinstance(error, KeyboardInterrupt):
    return INTERRUPT_EXIT
  if isinstance(error, OSError | FloatingPointError):
    return FAILURE_EXIT
  return None


def error_message(error: BaseException) -> str:
  """The text of an error, without the repr quoting a KeyError adds."""
  if isinstance(error, KeyboardInterrupt):
    return str(error) or 'Interrupted.'  # Ctrl-C's has no text.
  if len(error.args) == 1 and isinstance(error.args[0], BaseException):
    return error_message(error.args[0])  # ConfigDict wraps its KeyError.
  if isinstance(error, OSError) and error.strerror and error.filename:
    text = f'{error.strerror}: {error.filename!r}'
  elif len(error.args) == 1 and isinstance(error.args[0], str):
    text = error.args[0]
  else:
    text = str(error)
  return text.strip() or type(error).__name__


def report_error(error: BaseException, code: int) -> None:
  """Writes the short form of `error` to stderr."""
  hint = f' (set {TRACEBACK_ENV}=1 to see the traceback)'
  if code == INTERRUPT_EXIT or isinstance(error, app.UsageError | flags.Error):
    hint = ''  # Nothing went wrong inside: the message is the whole story.
  sys.stderr.write(f'Error: {error_message(error)}{hint}\n')


def traceback_requested() -> bool:
  """Whether `NFNETS_TRACEBACK` asks for full tracebacks."""
  return os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def _call_main(main, argv):
  if not flags.FLAGS['verbosity'].present:
    # JAX (no TPU found) and Orbax (every checkpoint operation) log at INFO.
    logging.set_verbosity(logging.WARNING)
  if traceback_requested():
    return main(argv)
  try:
    return main(argv)
  except (Exception, KeyboardInterrupt) as e:
    code = exit_code(e)
    if code is None:
      raise
    report_error(e, code)
    sys.exit(code)


def _override_error(error: BaseException) -> str:
  """The message of a failed `--config.*` override, unknown keys named."""
  cause = error
  while len(cause.args) == 1 and isinstance(cause.args[0], BaseException):
    cause = cause.args[0]
  message = error_message(cause)
  if isinstance(cause, KeyError):
    message = f'unknown key {message}'
  return message


def _check_config_file(argv, *, reads_run_config: bool) -> None:
  """Refuses a `--config` file that does not exist, before parsing.

  ml_collections defers that failure to the config's first use, in `main`,
  with a message about 'an earlier failure'. A JSON file is a run's saved
  config: `use_run_config` reads it where a command takes one; elsewhere
  ml_collections would run it as Python.
  """
  value = flag_value(argv, 'config')
  if not value or (value.endswith('.json') and reads_run_config):
    return
  if value.endswith('.json'):
    raise flags.ValidationError(
      f'--config={value} is JSON; this command takes a Python config file '
      '(configs/*.py). To resume a run, rerun the command that started it: '
      "the same --config and --workdir (the run's config.json is compared "
      'with it).'
    )
  path = value.split(':', 1)[0]
  if not os.path.isfile(os.path.expanduser(path)):
    raise flags.ValidationError(
      f'--config={value}: no config file {path!r}; pass one of configs/*.py '
      '(e.g. configs/f0.py), or a path to your own.'
    )


_CONFIG_FILE_ERROR = 'Error whilst parsing config file:'


def _without_config_traceback(message: str) -> str:
  """A config file's own error, without the traceback ml_collections adds.

  ml_collections puts the whole traceback of a `get_config` that raised
  (e.g. an unknown `--config=configs/f0.py:ARG`) into its message; the
  error's own text (which may have indented lines of its own) follows the
  last frame's source lines.
  """
  head, found, trace = message.partition(_CONFIG_FILE_ERROR)
  if not found:
    return message
  lines = trace.strip().splitlines()
  frames = [i for i, line in enumerate(lines) if line.startswith('  File ')]
  rest = lines[frames[-1] + 1 :] if frames else lines
  while rest and rest[0].startswith(' '):  # The frame's source and carets.
    rest = rest[1:]
  return head + '\n'.join(rest)


def parse_flags(argv, prepare=None):
  """Parses flags; flag and `--config.*` override errors exit with 2.

  Args:
    argv: the command line.
    prepare: optional `argv -> argv`, run before parsing (it may define
      flags, e.g. `use_run_config`).

  Returns:
    The positional arguments, as `absl.flags.FLAGS(argv)` returns them.
  """
  try:
    _check_config_file(argv, reads_run_config=prepare is use_run_config)
    if prepare is not None:
      argv = prepare(argv)
    return flags.FLAGS(argv)
  except flags.Error as e:
    if traceback_requested():
      raise
    message = _without_config_traceback(error_message(e))
    sys.stderr.write(f'Error: {message}\nPass --helpshort for the flags.\n')
    sys.exit(USAGE_EXIT)
  except RunConfigError as e:
    # Before the generic handler: no flag or override is at fault.
    if traceback_requested():
      raise
    sys.stderr.write(f'Error: {error_message(e)}\n')
    sys.exit(USAGE_EXIT)
  except (
    KeyError,
    AttributeError,
    TypeError,
    ValueError,
    FileNotFoundError,
    SyntaxError,  # In the config file: its message names file and line.
  ) as e:
    # ml_collections raises these (not flags.Error) for an unknown key or a
    # value of the wrong type; reading a config file can raise OSError.
    if traceback_requested():
      raise
    hint = (
      'Fix that line of the config file.'
      if isinstance(e, SyntaxError)
      else 'Check the --config.* key names and values against the config '
      'file (a run keeps its resolved config in <workdir>/config.json).'
    )
    sys.stderr.write(f'Error in the config: {_override_error(e)}\n{hint}\n')
    sys.exit(USAGE_EXIT)


def run(main, *, prepare=None) -> None:
  """`absl.app.run(main)` with a quiet start and short user errors.

  Args:
    main: the program's `main(argv)`.
    prepare: optional `argv -> argv` run before flag parsing (see
      `parse_flags`).
  """
  quiet_start.quiet_environment()
  quiet_start.quiet_tensorflow_import()
  app.run(
    functools.partial(_call_main, main),
    flags_parser=functools.partial(parse_flags, prepare=prepare),
  )


# ----------------------------------------------------------------------------
# The config of a training run, from its workdir.
# ----------------------------------------------------------------------------


def define_config_flag():
  """`--config`: a config file, or by default the `--workdir` run's config.

  Returns:
    The flag holder; its value is the resolved ConfigDict.
  """
  return config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file (configs/*.py[:arg]); default: the config the --workdir '
    'run saved (<workdir>/config.json). Override fields with --config.x=v.',
    lock_config=True,
  )


def json_object_flag(holder, example: str = '{"width": 0.5}') -> dict:
  """The value of a string flag that holds a JSON object, as a dict.

  Args:
    holder: the flag's holder.
    example: a valid value, shown in the error.

  Raises:
    app.UsageError: naming the flag, with an example of the quoting a
      shell needs (Python's single-quoted dicts are the usual mistake).
  """
  try:
    value = json.loads(holder.value)
  except json.JSONDecodeError:
    value = None
  if not isinstance(value, dict):
    raise app.UsageError(
      f'--{holder.name}={holder.value} is not a JSON object; write it as '
      f"--{holder.name}='{example}' (keys in double quotes)."
    )
  return value


def validate_int_range(holder, lower: int, upper=None, meaning: str = ''):
  """Checks an integer flag when flags are parsed (None: not given).

  absl's own bounds say only "is not an integer in the range"; this names
  the range and what the flag means, before any work is done.

  Args:
    holder: the integer flag's holder.
    lower: the smallest value allowed.
    upper: the largest value allowed (None: no bound).
    meaning: what the value is, for the message.
  """
  allowed = f'at least {lower}' if upper is None else f'{lower} to {upper}'

  def check(value) -> bool:
    if value is not None and not (
      lower <= value and (upper is None or value <= upper)
    ):
      # absl's message starts "flag --name=value: ".
      raise flags.ValidationError(f'pass {allowed} ({meaning}).')
    return True

  flags.register_validator(holder, check)


def define_step_flag():
  """--step: which checkpoint of a --workdir run (default the newest)."""
  return flags.DEFINE_integer(
    'step', None,
    "With --workdir: this step's checkpoint (default: the newest readable).",
    lower_bound=0,
  )  # fmt: skip


def flag_value(argv, name: str) -> str | None:
  """The value of `--name=V` or `--name V` in `argv`, else None."""
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    for prefix in (f'--{name}', f'-{name}'):
      if arg.startswith(prefix + '='):
        return arg[len(prefix) + 1 :]
      if arg == prefix and i + 1 < len(argv):
        return argv[i + 1]
  return None


def _without_flag(argv, name: str):
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    if arg in (f'--{name}', f'-{name}'):
      skip = True
      continue
    if arg.startswith((f'--{name}=', f'-{name}=')):
      continue
    out.append(arg)
  return out


class RunConfigError(ValueError):
  """A run's `config.json` that is not a run config (damaged or replaced)."""


def saved_run_config(workdir: str):
  """The config a training run saved in `workdir`, or None if it has none.

  A `config.json` that is not the run's config (truncated, or another JSON
  file written over it) is refused here with the way to restore it, rather
  than failing later on a missing `config.data`.

  Args:
    workdir: a training workdir.

  Returns:
    A ConfigDict (`nfnets.train.provenance.load_run_config`) or None.

  Raises:
    RunConfigError: `config.json` is damaged.
  """
  workdir = os.path.expanduser(workdir or '')
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  if not workdir or not os.path.isfile(path):
    return None
  from nfnets.train import provenance

  records = provenance.segment_records(workdir)
  try:
    config = provenance.load_run_config(workdir)
  except ValueError as e:
    raise RunConfigError(_damaged_config(path, records, str(e))) from e
  # The sections the run's newest segment record has (each command reads
  # some of them); without records, the two every command reads.
  newest = records[-1][1] if records else None
  newest = newest.get('config') if isinstance(newest, dict) else None
  if not isinstance(newest, dict):
    newest = {'data': {}, 'model': {}}
  missing = [
    key
    for key, value in newest.items()
    if isinstance(value, dict) and not hasattr(config.get(key), 'items')
  ]
  if missing:
    lacks = ', '.join(missing) + (' sections' if missing[1:] else ' section')
    problem = f'{path!r} is not a run config (it lacks the {lacks})'
    raise RunConfigError(_damaged_config(path, records, problem))
  return config


def _damaged_config(path: str, records, problem: str) -> str:
  """The message for an unusable config.json: what, and how to restore it.

  Training keeps each segment's config in `configs/segment_NNN_step_S.json`
  beside it, and `load_run_config` reads such a record copied over
  `config.json`, so the newest one restores it.
  """
  text = f'{problem.rstrip(".")}: it was damaged or replaced. '
  if not records:
    return text + (
      'The run has no configs/segment_*.json record to restore it from: '
      'pass the config it was trained with, --config=configs/<name>.py.'
    )
  newest, path = shlex.quote(records[-1][0]), shlex.quote(path)
  return text + (
    "Restore it from the newest of the run's per-segment configs "
    f'(configs/segment_*.json): cp {newest} {path}'
  )


def use_run_config(argv):
  """Before parsing: makes `--config` default to the run's saved config.

  With `--workdir=W` and no `--config`, `--config` becomes W's saved config
  (overrides `--config.x=v` apply on top). `--config=W/config.json` is read
  the same way; any other JSON file is a usage error.

  Args:
    argv: the command line.

  Returns:
    The command line to parse.

  Raises:
    app.UsageError: no config can be found.
  """
  config_arg = flag_value(argv, 'config')
  workdir = flag_value(argv, 'workdir')
  if config_arg is not None and config_arg.endswith('.json'):
    run_dir = os.path.dirname(config_arg) or '.'
    if os.path.basename(config_arg) != RUN_CONFIG_FILE:
      raise flags.ValidationError(
        f'--config={config_arg} is JSON; --config takes a Python config '
        'file (configs/*.py). For a training run, pass --workdir=DIR alone: '
        'its saved config.json is used.'
      )
    argv, workdir = _without_flag(argv, 'config'), run_dir
    if not os.path.isfile(config_arg):
      raise flags.ValidationError(
        f'--config={config_arg}: no such file. Pass the --workdir of a '
        'training run (its config.json is read), or a config file '
        '(configs/*.py).'
      )
  elif config_arg is not None or workdir is None:
    return argv
  if not os.path.isdir(os.path.expanduser(workdir)):
    raise flags.ValidationError(
      f'--workdir={workdir} is not a directory: pass the --workdir of a '
      'training run, or a config with --config=configs/<name>.py.'
    )
  saved = saved_run_config(workdir)
  if saved is None:
    raise flags.ValidationError(
      f'{os.path.join(workdir, RUN_CONFIG_FILE)} does not exist: pass the '
      '--workdir of a training run, or its config with '
      '--config=configs/<name>.py.'
    )
  delattr(flags.FLAGS, 'config')
  # sys_argv: the overrides to define are read from it (default sys.argv,
  # which may still name a config.json).
  config_flags.DEFINE_config_dict(
    'config', saved, "The run's saved config.", lock_config=True,
    sys_argv=argv,
  )  # fmt: skip
  return argv


def print_config_differences(workdir: str, config) -> None:
  """Prints to stderr how `config` differs from the run's saved config.

  Args:
    workdir: the training workdir (may hold no config.json).
    config: the config in use.
  """
  try:
    saved = saved_run_config(workdir)
  except RunConfigError as e:  # The config in use is given: just say so.
    sys.stderr.write(f"Warning: not compared with the run's config: {e}\n")
    return
  if saved is None:
    return
  from nfnets.train import resume_rules

  differences = resume_rules.config_differences(saved, config)
  if differences:
    sys.stderr.write(
      "Differences from the run's saved config:\n"
      + ''.join(f'  {d}\n' for d in differences)
    )
