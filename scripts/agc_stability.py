r"""A standalone study: the paper's AGC stability claim, small, on a tiny NFNet.

Trains the same tiny NFNet (`nfnets.NFNet` with one block per stage and
narrow blocks) on scikit-learn's digits (upscaled to 32x32 RGB, no download)
with the reference optimizer (`nfnets.optim.sgd_agc`: Nesterov SGD, no
warmup), with and without AGC, over a range of constant learning rates. Same
init, same data order, same seed in every run; only `clipping` changes.

Usage:
  python -m scripts.agc_stability --lrs=0.1,0.4,1.6 --steps=100 \
      --out=runs/agc_stability.json

Prints one line per run (max loss, final loss, held-out accuracy) and, with
--out, writes the runs so far as JSON after each one (an interrupted study
keeps what it finished); docs/optim.md records its result. Bad flags (a
learning rate that is no number, --steps=0, an --out whose folder does not
exist) are a one-line error before anything trains. It builds its own loop
around `nfnets.optim.sgd_agc` rather than the trainer, so that nothing but
`clipping` differs between runs.
"""

import math
import os
import time

import numpy as np
from absl import app, flags

from experiments import common
from nfnets import atomic_files

_LRS = flags.DEFINE_list('lrs', ['0.1', '0.4', '1.6'], 'Learning rates.')
_CLIPPINGS = flags.DEFINE_list(
  'clippings', ['0', '0.01'], 'AGC clipping values; 0 means no AGC.'
)
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (init and data order).')
_STEPS = flags.DEFINE_integer('steps', 100, 'Training steps per run.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_WIDTH = flags.DEFINE_float('width', 0.125, 'NFNet block-width multiplier.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')

NUM_TRAIN = 1500  # The rest of the 1797 digits is held out.


def _number_list(kind, check, meaning: str):
  """A validator: every item of a list flag is a `kind` passing `check`."""

  def validate(items) -> bool:
    for item in items:
      try:
        value = kind(item)
      except ValueError:
        value = None
      if value is None or not check(value):
        raise flags.ValidationError(f'{item!r} is not {meaning}.')
    if not items:
      raise flags.ValidationError(f'give at least one value ({meaning}).')
    return True

  return validate


def _out_path(path: str) -> bool:
  """--out's validator: a file in an existing folder, found before training."""
  if not path:
    return True
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise flags.ValidationError(f'{path} is a directory; name a JSON file.')
  if not os.path.isdir(folder):
    raise flags.ValidationError(
      f'its folder {folder} does not exist; create it or pass another --out.'
    )
  return True


flags.register_validator(
  'lrs',
  _number_list(float, lambda v: math.isfinite(v) and v > 0, 'a number > 0'),
)
flags.register_validator(
  'clippings',
  _number_list(float, lambda v: math.isfinite(v) and v >= 0, 'a number >= 0'),
)
flags.register_validator(
  'seeds', _number_list(int, lambda v: v >= 0, 'an integer >= 0')
)
common.validate_int_range(_STEPS, 1, meaning='training steps per run')
common.validate_int_range(_BATCH, 1, meaning='images per step')
flags.register_validator(
  'width', lambda v: v > 0, 'pass a block-width multiplier > 0.'
)
flags.register_validator('out', _out_path)


def digits_32px() -> tuple[np.ndarray, np.ndarray]:
  """Digits as normalised 32x32x3 float32 images and int32 labels."""
  from sklearn.datasets import load_digits  # noqa: PLC0415

  digits = load_digits()
  x = digits.images.astype(np.float32) / 16.0
  x = np.repeat(np.repeat(x, 4, 1), 4, 2)
  x = np.repeat(x[..., None], 3, -1)
  return (x - x.mean()) / x.std(), digits.target.astype(np.int32)


def make_net(width: float):
  """A tiny NFNet-F0: one block per stage, groups of 8, no regularisers."""
  import haiku as hk  # noqa: PLC0415  (flag errors come first, fast)

  import nfnets  # noqa: PLC0415

  def forward(images, is_training):
    net = nfnets.NFNet(
      num_classes=10,
      width=width,
      depth=(1, 1, 1, 1),
      group_size=8,
      stochdepth_rate=0.0,
      drop_rate=0.0,
    )
    return net(images, is_training)['logits']

  return hk.without_apply_rng(hk.transform(forward))


def make_step(net, clipping: float):
  """The jitted train step; the learning rate is an argument (one compile)."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from nfnets import optim  # noqa: PLC0415

  def loss_fn(params, images, labels):
    logits = net.apply(params, images, True)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  @jax.jit
  def step(params, state, images, labels, lr):
    tx = optim.sgd_agc(lr, weight_decay=0.0, clipping=clipping or None)
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def run_trial(net, data, step, lr: float, seed: int) -> tuple[list, dict]:
  """Trains one run from `seed`; returns the losses and the final params."""
  import jax  # noqa: PLC0415

  from nfnets import optim  # noqa: PLC0415

  x, y = data
  params = net.init(jax.random.PRNGKey(seed), x[:1], True)
  # The state's structure does not depend on the learning rate.
  state = optim.sgd_agc(0.0, weight_decay=0.0).init(params)
  rng = np.random.RandomState(seed)
  losses = []
  for _ in range(_STEPS.value):
    idx = rng.randint(0, NUM_TRAIN, _BATCH.value)
    params, state, loss = step(params, state, x[idx], y[idx], lr)
    losses.append(float(loss))
  return losses, params


def summarize(losses: list[float], accuracy: float, **info) -> dict:
  """One run's summary: diverged = a non-finite loss or a loss above 1e3."""
  finite = [v for v in losses if np.isfinite(v)]
  return dict(
    info,
    diverged=bool(len(finite) < len(losses) or max(finite) > 1e3),
    max_loss=max(finite) if finite else float('nan'),
    final_loss=float(np.mean(losses[-10:])),
    test_accuracy=accuracy,
  )


def write_results(path: str, results: list[dict]) -> None:
  """Writes the runs so far as JSON, whole (a reader never sees half)."""
  atomic_files.write_json(path, results, indent=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  net, (x, y) = make_net(_WIDTH.value), digits_32px()
  predict = jax.jit(lambda p, im: jnp.argmax(net.apply(p, im, False), -1))
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}')
  results = []
  for clipping in map(float, _CLIPPINGS.value):
    step = make_step(net, clipping)
    for lr in map(float, _LRS.value):
      for seed in map(int, _SEEDS.value):
        start = time.time()
        losses, params = run_trial(net, (x, y), step, lr, seed)
        accuracy = float(
          np.mean(predict(params, x[NUM_TRAIN:]) == y[NUM_TRAIN:])
        )
        r = summarize(losses, accuracy, lr=lr, clipping=clipping, seed=seed)
        results.append(r)
        print(
          f'lr={lr:<5} clipping={clipping:<5} seed={seed} '
          f'diverged={r["diverged"]!s:<5} max_loss={r["max_loss"]:.3g} '
          f'final_loss={r["final_loss"]:.3g} '
          f'test_acc={accuracy:.3f} ({time.time() - start:.1f}s)',
          flush=True,
        )
        if _OUT.value:
          write_results(_OUT.value, results)


if __name__ == '__main__':
  common.run(main)
