"""Default `train`, `eval` and `checkpoint` config sections, and validation.

The model, data and optimizer sections come from their own modules
(`nfnets.models`, `nfnets.data`, `nfnets.optim`); the sections here hold
everything the training loop itself reads. Every key is read by
`nfnets.train.loop` (or a helper it calls); `validate_config` rejects values
that would only fail later, with a message that says what to change.
"""

import fractions
import json
import math
import os

import ml_collections

from nfnets.data import config as data_config_lib
from nfnets.models import precision

COMPUTE_DTYPES = precision.POLICIES
DATA_RESUME_MODES = ('skip', 'reseed')
HOST_INPUT_MODES = ('shard', 'slice')


def default_train_config() -> ml_collections.ConfigDict:
  """Returns the `config.train` section with the paper's defaults.

  Returns:
    A ConfigDict with keys:
      batch_size: global batch size over all devices and hosts.
      grad_accum_steps: micro-batches per optimizer step: the batch is
        processed in this many parts one after another and their gradients
        averaged (same update, a fraction of the activation memory; see
        `nfnets.train.step.make_train_step`). batch_size must be a multiple
        of grad_accum_steps times the device count.
      num_epochs: length of the run in passes over the train split.
      num_steps: if > 0, length of the run in steps (overrides num_epochs);
        0: num_epochs decides.
      compute_dtype: 'bfloat16', 'float32' or 'bfloat16_convs' (float32
        with bfloat16 convolution operands, the fast policy on AVX-512
        CPUs with bfloat16 units; `nfnets.models.precision`) for the
        forward/backward pass; master weights, optimizer state and the
        loss stay float32.
      label_smoothing: weight of the uniform distribution in the targets.
      seed: seed for parameter init and per-step randomness.
      log_every_steps: how often train metrics are logged.
      data_resume: how the input pipeline continues after a restart: 'skip'
        replays the data order by skipping the batches already seen (exact,
        costs one pass over them), 'reseed' starts a fresh shuffle seeded by
        the step (cheap; the order differs from an uninterrupted run).
      host_input: how hosts split the input: 'shard' (each host reads its
        own shard of the data; the default, and the only scalable choice) or
        'slice' (every host builds the same global batches and keeps its own
        rows: the data order is independent of the number of hosts, at
        process_count times the input cost; for small data and debugging).
      compilation_cache_dir: persistent XLA compilation cache ('' = off).
      distributed: multi-host settings (see `default_distributed_config`).
  """
  return ml_collections.ConfigDict(
    dict(
      batch_size=4096,
      grad_accum_steps=1,
      num_epochs=360.0,
      num_steps=0,
      compute_dtype='bfloat16',
      label_smoothing=0.1,
      seed=0,
      log_every_steps=100,
      data_resume='reseed',
      host_input='shard',
      compilation_cache_dir='~/.cache/nfnets/jax_compilation_cache',
      distributed=default_distributed_config(),
    )
  )


def default_distributed_config() -> ml_collections.ConfigDict:
  """Returns `config.train.distributed`: `jax.distributed.initialize` args.

  Returns:
    A ConfigDict with keys:
      enabled: call `jax.distributed.initialize` before anything else.
      coordinator_address: 'host:port' of process 0 ('' = auto-detect from
        the cluster environment, e.g. SLURM or Cloud TPU).
      num_processes: number of processes (0 = auto-detect).
      process_id: this process's index (-1 = auto-detect).
      cpu_collectives: CPU cross-process collectives ('gloo' or 'mpi'); only
        used when the platform is CPU, where jax has none by default.
  """
  return ml_collections.ConfigDict(
    dict(
      enabled=False,
      coordinator_address='',
      num_processes=0,
      process_id=-1,
      cpu_collectives='gloo',
    )
  )


def default_eval_config() -> ml_collections.ConfigDict:
  """Returns the `config.eval` section.

  Returns:
    A ConfigDict with keys:
      batch_size: global eval batch size (the last batch is padded and
        masked, so any split size works).
      every_steps: evaluate every this many train steps (0 = only at the end).
      ema: also evaluate the EMA parameters when the optimizer keeps an EMA.
  """
  return ml_collections.ConfigDict(
    dict(batch_size=256, every_steps=0, ema=True)
  )


def default_checkpoint_config() -> ml_collections.ConfigDict:
  """Returns the `config.checkpoint` section.

  Returns:
    A ConfigDict with keys:
      enabled: write checkpoints to `<workdir>/checkpoints` and resume from
        the newest one found there.
      every_steps: save every this many steps (0 = only at the end and on
        SIGTERM or Ctrl-C).
      max_to_keep: how many of the newest checkpoints to keep (>= 1).
      save_on_sigterm: on SIGTERM (preemption) or Ctrl-C (SIGINT), save
        after the current step and stop cleanly; rerunning the same command
        resumes. A second Ctrl-C exits at once.
  """
  return ml_collections.ConfigDict(
    dict(enabled=True, every_steps=1000, max_to_keep=3, save_on_sigterm=True)
  )


SECTIONS = ('model', 'data', 'optimizer', 'train', 'eval', 'checkpoint')
_BASE_HINT = (
  "start from configs/common.py's base_config() or a configs/*.py "
  'get_config(), which hold every key'
)


def _check_sections(config) -> None:
  """Names a missing section or loop key (not an AttributeError later)."""
  if not isinstance(
    config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict
  ):
    raise ValueError(
      f'The config is a {type(config).__name__}, not an ml_collections '
      f'ConfigDict with the sections {", ".join(SECTIONS)}: {_BASE_HINT}.'
    )
  missing = [name for name in SECTIONS if name not in config]
  if missing:
    raise ValueError(
      f'The config lacks the section(s) {", ".join(missing)}: {_BASE_HINT}.'
    )
  defaults = {
    'train': default_train_config(),
    'eval': default_eval_config(),
    'checkpoint': default_checkpoint_config(),
  }
  for name, default in defaults.items():
    lacks = [key for key in default if key not in config[name]]
    if lacks:
      raise ValueError(f'config.{name} lacks {", ".join(lacks)}: {_BASE_HINT}.')


def check_workdir(config, workdir: str) -> None:
  """Refuses a workdir the run cannot use as `config` says.

  A file is no workdir, nor a folder whose config.json no run wrote (a
  model folder, say): the run would replace that file. Checkpoints off
  over a run that has some would start again from step 0 beside them, and
  a later resume with them on would continue the old checkpoints under the
  new segment's config, past the resume rules.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(
      f'workdir {workdir} is a file; pass a directory (a new one starts a '
      'run, an existing run directory resumes it).'
    )
  saved = os.path.join(workdir, 'config.json')
  if os.path.isfile(saved) and not _written_by_a_run(workdir):
    raise ValueError(
      f"{saved} is not a training run's config (no model, data and train "
      'sections), and training would replace it: pass a new --workdir, or '
      "a run's."
    )
  directory = os.path.join(workdir, 'checkpoints')
  steps = os.listdir(directory) if os.path.isdir(directory) else []
  steps = sorted(int(name) for name in steps if name.isdigit())
  if steps and not config.checkpoint.enabled:
    raise ValueError(
      f'{workdir} holds a run with checkpoints (newest: step {steps[-1]}), '
      'but config.checkpoint.enabled=False would train again from step 0 '
      'beside them. Resume it with checkpoints on, or use a fresh --workdir.'
    )


def _written_by_a_run(workdir: str) -> bool:
  """Whether the workdir's config.json is a run's (or its records are)."""
  if os.path.isdir(os.path.join(workdir, 'configs')):
    return True  # A damaged config.json is restored from these.
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {'model', 'data', 'train'} <= set(saved)


def run_length(train_config, num_train_examples: int) -> tuple[int, float]:
  """Returns (total_steps, steps_per_epoch) of a run.

  Epochs count whole batches, as the reference's `num_examples * epochs //
  batch_size` (F0: 112,602 steps); the epochs are read as written (8.1,
  not its binary approximation), so a whole number of batches is exact.

  Args:
    train_config: `config.train` (`num_steps` > 0 decides, else
      `num_epochs`).
    num_train_examples: the size of the training split.

  Raises:
    ValueError: the epochs come to less than one batch.
  """
  steps_per_epoch = num_train_examples / train_config.batch_size
  if train_config.num_steps > 0:
    return int(train_config.num_steps), steps_per_epoch
  epochs, batch = train_config.num_epochs, train_config.batch_size
  steps = math.floor(
    fractions.Fraction(str(epochs)) * num_train_examples / batch
  )
  if steps < 1:
    raise ValueError(
      f'config.train.num_epochs={epochs} of {num_train_examples} examples is '
      f'less than one batch of {batch}: train more epochs, or set '
      'config.train.num_steps.'
    )
  return steps, steps_per_epoch


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the loop's own config values; raises ValueError with a fix.

  Args:
    config: the full experiment config.

  Raises:
    ValueError: for a value the loop cannot run with.
  """
  _check_sections(config)
  # `config.data` too (its name, sizes, MixUp): a typo must not reach a
  # resume's config check, which would offer --allow_config_change for it.
  data_config_lib.validate_data_config(config.data)
  train = config.train
  if train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(
      f'config.train.compute_dtype={train.compute_dtype!r} is not one of '
      f'{COMPUTE_DTYPES}.'
    )
  if train.data_resume not in DATA_RESUME_MODES:
    raise ValueError(
      f'config.train.data_resume={train.data_resume!r} is not one of '
      f'{DATA_RESUME_MODES}.'
    )
  if train.host_input not in HOST_INPUT_MODES:
    raise ValueError(
      f'config.train.host_input={train.host_input!r} is not one of '
      f'{HOST_INPUT_MODES}.'
    )
  nondeterministic = not config.data.deterministic and (
    config.data.get('loader', 'auto') != 'python'  # Always in order.
  )
  if train.host_input == 'slice' and nondeterministic:
    # Each host keeps its rows of the global batch it builds: the batches
    # must be the same on every host, so tf.data's order cannot vary.
    raise ValueError(
      "config.train.host_input='slice' needs config.data.deterministic=True "
      '(every host must build the same batches).'
    )
  if train.batch_size <= 0 or config.eval.batch_size <= 0:
    raise ValueError(
      'config.train.batch_size and config.eval.batch_size must be positive.'
    )
  accum = train.grad_accum_steps
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ValueError(
      f'config.train.grad_accum_steps must be an integer >= 1, got {accum!r}.'
    )
  if train.num_steps < 0:
    raise ValueError(
      f'config.train.num_steps={train.num_steps}: use a number of steps > 0, '
      'or 0 for the length config.train.num_epochs gives.'
    )
  if train.num_steps <= 0 and train.num_epochs <= 0:
    raise ValueError(
      'Set config.train.num_epochs > 0 or config.train.num_steps > 0.'
    )
  for key in ('checkpoint.every_steps', 'eval.every_steps'):
    section, name = key.split('.')
    if config[section][name] < 0:
      raise ValueError(f'config.{key} must be >= 0 (0: only at the end).')
  if config.checkpoint.max_to_keep < 1:
    # 0 would keep no checkpoint at all, while saying it saved one.
    raise ValueError('config.checkpoint.max_to_keep must be >= 1.')
  if train.log_every_steps <= 0:
    raise ValueError('config.train.log_every_steps must be >= 1.')
  if not 0.0 <= train.label_smoothing < 1.0:
    raise ValueError('config.train.label_smoothing must be in [0, 1).')
