"""The train state a run starts from: fresh, pretrained or restored.

`initial_train_state` builds the step-0 state from the config's seed
(jitted, replicated over the mesh), loads `config.model.init_from` weights
into it when set (fine-tuning), and replaces it with the newest checkpoint
of the run when there is one. `abstract_train_state` gives the shapes of
that state without computing anything, the target for restoring a run's
checkpoints elsewhere (`nfnets.train.evaluation`).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models, optim, pretrained
from nfnets.train import mesh as mesh_lib
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
  if config.model.init_from:
    params = _load_init_params(config.model, state.params, mesh)
    # The optimizer and the EMA start from the loaded weights; the Haiku
    # state (BatchNorm statistics) is not in weights files and stays fresh.
    ema = config.optimizer.ema_decay > 0
    restart = lambda p, s: state_lib.make_train_state(
      p, s.model_state, optimizer, s.rng, ema=ema
    )
    state = jax.jit(restart, out_shardings=repl)(params, state)
  if checkpointer is not None:
    # Damaged checkpoints are moved aside: kept, and out of the way of the
    # new ones (Orbax's retention would delete them, or skip their steps).
    restored = checkpointer.restore(state, log=log, set_aside_damaged=True)
    if restored is not None:
      log(
        f'Resuming from {checkpointer.directory} at step {int(restored.step)}.'
      )
      return restored
  return state


def _load_init_params(model_config, params, mesh):
  """Loads `init_from` weights into `params` (fresh classifier if needed)."""
  loaded, _ = pretrained.read_params(model_config.init_from)
  merged = pretrained.merge_pretrained(
    jax.device_get(params),
    loaded,
    reinit_modules=tuple(model_config.reinit_modules),
  )
  return mesh_lib.replicate(merged, mesh)
