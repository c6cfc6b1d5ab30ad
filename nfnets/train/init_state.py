"""The train state a run starts from: fresh, pretrained or restored.

`initial_train_state` builds the step-0 state from the config's seed
(jitted, replicated over the mesh), loads `config.model.init_from` into it
when set (fine-tuning from a weights file or another run's workdir), and
replaces it with the newest checkpoint of the run when there is one.
`abstract_train_state` gives the shapes of that state without computing
anything, the target for restoring a run's checkpoints elsewhere
(`nfnets.train.evaluation`).
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models, optim, pretrained
from nfnets.train import mesh as mesh_lib
from nfnets.train import provenance
from nfnets.train import state as state_lib

# The optimizer's state structure does not depend on the run length; any
# length longer than every warmup satisfies make_optimizer's checks.
_ANY_RUN_LENGTH = 10**9


def _init_fn(config, model, optimizer):
  """`rng -> TrainState` of step 0 (random init) for `config`."""
  size = config.data.train_image_size
  shape = (1, size, size, 3)  # One example is enough to shape the params.
  ema = config.optimizer.ema_decay > 0

  def init(rng):
    init_rng, train_rng = jax.random.split(rng)
    images = jnp.zeros(shape, jnp.float32)
    params, model_state = model.init(init_rng, images, True)
    return state_lib.make_train_state(
      params, model_state, optimizer, train_rng, ema=ema
    )

  return init


def abstract_train_state(config, num_classes: int) -> state_lib.TrainState:
  """Shapes and dtypes of the `TrainState` a run of `config` keeps.

  Nothing is computed (`jax.eval_shape`); the result is the target for
  restoring the run's checkpoints elsewhere, e.g. `nfnets.train.evaluation`.

  Args:
    config: the run's config (model, optimizer, data.train_image_size,
      train.batch_size).
    num_classes: the dataset's number of classes.

  Returns:
    A `TrainState` of `jax.ShapeDtypeStruct`s (None for absent EMAs).
  """
  model = models.make_model(config.model, num_classes)
  optimizer, _ = optim.make_optimizer(
    config.optimizer,
    steps_per_epoch=1.0,
    total_steps=_ANY_RUN_LENGTH,
    global_batch_size=config.train.batch_size,
  )
  init = _init_fn(config, model, optimizer)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def initial_train_state(
  config,
  *,
  mesh,
  model,
  optimizer,
  checkpointer=None,
  log: Callable[[str], None] = print,
) -> state_lib.TrainState:
  """The state a run starts from, replicated over `mesh`.

  Args:
    config: the run's config (seed, model.init_from, optimizer.ema_decay).
    mesh: the data mesh.
    model: the run's `hk.TransformedWithState`.
    optimizer: the run's optax transformation.
    checkpointer: the run's `Checkpointer`, or None (checkpoints off).
    log: prints a line (the note that the run resumes, warnings about
      damaged checkpoints).

  Returns:
    The newest readable checkpoint's state if there is one; else a fresh
    state of step 0, with the `config.model.init_from` weights when set.

  Raises:
    checkpoint.CheckpointError: the checkpoints do not fit this config, or
      none is readable.
  """
  repl = mesh_lib.replicated_sharding(mesh)
  rng = mesh_lib.replicate(
    np.asarray(jax.random.PRNGKey(config.train.seed)), mesh
  )
  init = _init_fn(config, model, optimizer)
  # Every process holds the same key, so every process builds the same init.
  state = jax.jit(init, in_shardings=repl, out_shardings=repl)(rng)
  if checkpointer is not None:
    # Damaged checkpoints are moved aside: kept, and out of the way of the
    # new ones (Orbax's retention would delete them, or skip their steps).
    restored = checkpointer.restore(state, log=log, set_aside_damaged=True)
    if restored is not None:
      log(
        f'Resuming from {checkpointer.directory} at step {int(restored.step)}.'
      )
      return restored
  if config.model.init_from:  # Only at step 0: it may be gone by a resume.
    params, model_state = _load_init_from(config.model, state, mesh, log)
    # The optimizer and the EMA start from the loaded weights.
    ema = config.optimizer.ema_decay > 0
    restart = lambda p, s, rng: state_lib.make_train_state(
      p, s, optimizer, rng, ema=ema
    )
    state = jax.jit(restart, out_shardings=repl)(params, model_state, state.rng)
  return state


def _load_init_from(model_config, state, mesh, log):
  """`(params, model_state)` from `init_from`, replicated over `mesh`.

  A weights file gives the params; the Haiku state (BatchNorm statistics)
  is not in weights files and stays fresh. A training run's workdir gives
  its newest checkpoint's EMA params (raw ones if it keeps no EMA), and
  its Haiku state, which is what its evaluations used. Every parameter is
  taken except those of `model_config.reinit_modules` whose shapes differ
  (a classifier for another number of classes).
  """
  path = os.path.expanduser(model_config.init_from)
  fresh_params, fresh_state = jax.device_get((state.params, state.model_state))
  reinit = tuple(model_config.reinit_modules)
  if os.path.isdir(path):
    loaded, loaded_state = _read_run(path, log)
    fresh_state = pretrained.merge_pretrained(
      fresh_state, loaded_state, reinit_modules=reinit
    )
  else:
    loaded, _ = pretrained.read_params(path)
  params = pretrained.merge_pretrained(
    fresh_params, loaded, reinit_modules=reinit
  )
  return mesh_lib.replicate((params, fresh_state), mesh)


def _read_run(workdir: str, log):
  """The params and Haiku state a training run's evaluations used."""
  # Imported here: run_weights imports evaluation, which imports this module.
  from nfnets.train import run_weights

  if not os.path.isfile(os.path.join(workdir, provenance.CONFIG_FILE)):
    raise FileNotFoundError(
      f'config.model.init_from={workdir!r} is a directory without a '
      "training run's config.json: pass a weights file or a run's workdir."
    )
  run = run_weights.run_params(workdir, 'auto', log=log)
  log(f'Starting from {run.description} of the run in {workdir}.')
  return run.params, run.model_state
