"""Helper script (not a test): a tiny training job in a fresh process.

The device count must be fixed before JAX is imported, so the multi-device
and multi-process tests (tests/train/test_multidevice.py) run this script in
subprocesses:

    python tests/support/train_harness.py --devices=8 --workdir=W \
      --out=out.npz [--num_processes=2 --process_id=0 --port=12345] \
      [--set key=value ...]

It trains a tiny NFNet on the digits (`tiny_config`) with the TensorFlow-free
loader, then process 0 writes the final params (flattened `module/param`
keys), the per-step train losses from metrics.jsonl, and the final eval
top-1 to `--out`. The single-process
loop tests (tests/train/test_loop.py) import `tiny_config` from here.

With `--bn_step_check` it trains nothing: it runs two train steps of a tiny
conv + BatchNorm model jitted over all devices with the batch sharded, the
same steps on one device, and the steps on the first device's rows alone,
and writes the three resulting states (`sharded/`, `single/`, `local/`).
"""

import argparse
import ast
import json
import os
import sys

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def tiny_config(compilation_cache_dir: str = ''):
  """The quickstart config shrunk for tests: 6 steps of batch 16 at 32 px.

  Dropout and stochastic depth stay on, so the tests also cover per-step
  randomness across device counts.

  Args:
    compilation_cache_dir: persistent XLA cache shared by the test runs.

  Returns:
    An unlocked-for-overrides (but locked) ConfigDict.
  """
  from configs import quickstart  # noqa: PLC0415

  config = quickstart.get_config()
  config.model.kwargs.width = 0.0625
  # One group per conv and no conv1b: fewer ops, so much faster to compile.
  config.model.kwargs.group_size = 64
  config.model.kwargs.use_two_convs = False
  config.model.kwargs.stochdepth_rate = 0.2
  config.model.kwargs.drop_rate = 0.2
  config.train.batch_size = 16
  config.optimizer.warmup_steps = 1
  config.train.num_steps = 6
  config.train.log_every_steps = 1
  config.train.compilation_cache_dir = compilation_cache_dir
  config.eval.batch_size = 120
  config.checkpoint.every_steps = 0
  return config


def _apply_overrides(config, assignments):
  for item in assignments:
    key, value = item.split('=', 1)
    *path, leaf = key.split('.')
    section = config
    for name in path:
      section = section[name]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A plain string.
    section[leaf] = value


def _losses(workdir):
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[record['step']] = record['train/loss']
  return [losses[s] for s in sorted(losses)]


def _check_bad_batch_size(config):
  """On >1 device, a batch not divisible by the device count must fail."""
  import jax  # noqa: PLC0415

  from nfnets.train import mesh as mesh_lib  # noqa: PLC0415

  n = jax.device_count()
  try:
    mesh_lib.check_batch_size(n + 2, mesh_lib.make_mesh(), 'batch')
  except ValueError as e:
    print('BAD_BATCH_ERROR:', e, flush=True)


def _flat(prefix, tree):
  """`{prefix/module/name: array}` of a Haiku params or state dict."""
  import numpy as np  # noqa: PLC0415

  return {
    f'{prefix}/{m}/{n}': np.asarray(v) for m, d in tree.items()
    for n, v in d.items()
  }  # fmt: skip


def bn_step_check(out: str) -> None:
  """Writes the states after 2 BN train steps: sharded, 1 device, 1 shard."""
  import haiku as hk  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from nfnets import optim  # noqa: PLC0415
  from nfnets.train import losses  # noqa: PLC0415
  from nfnets.train import mesh as mesh_lib  # noqa: PLC0415
  from nfnets.train import state as state_lib  # noqa: PLC0415
  from nfnets.train import step as step_lib  # noqa: PLC0415

  def forward(images, is_training):
    x = hk.Conv2D(4, 3, stride=2, with_bias=False)(images)
    x = hk.BatchNorm(True, True, decay_rate=0.9)(x, is_training)
    x = jax.nn.relu(x).mean(axis=(1, 2))
    return {'logits': hk.Linear(3, w_init=hk.initializers.RandomNormal())(x)}

  model = hk.transform_with_state(forward)
  rng = np.random.RandomState(0)
  n = 2 * jax.device_count()
  batch = {
    'images': (1.0 + 2.0 * rng.randn(n, 8, 8, 3)).astype(np.float32),
    'labels': rng.randint(0, 3, n).astype(np.int32),
  }
  params, model_state = model.init(
    jax.random.PRNGKey(0), batch['images'][:1], True
  )
  # Plain SGD at a constant LR of 0.5: no AGC, momentum, decay or warmup.
  opt_config = optim.default_config()
  opt_config.update(
    name='sgd', lr=0.5, min_lr=0.5, scale_lr_by_batch=False, warmup_steps=0,
    momentum=0.0, nesterov=False, weight_decay=0.0, clipping=0.0,
    ema_decay=0.0,
  )  # fmt: skip
  hyperparams = optim.hyperparams(
    opt_config, steps_per_epoch=1, total_steps=10, global_batch_size=n
  )
  hyperparams.update(losses.label_smoothing_inputs(0.0, 3))
  tx, _ = optim.build_optimizer(opt_config, hyperparams)
  train_step = step_lib.make_train_step(
    model, num_classes=3, opt_config=opt_config, compute_dtype='float32'
  )
  step = lambda state, rows: train_step(state, rows, hyperparams)
  mesh = mesh_lib.make_mesh()
  repl = mesh_lib.replicated_sharding(mesh)
  sharded = jax.jit(
    step,
    in_shardings=(repl, mesh_lib.batch_sharding(mesh)),
    out_shardings=(repl, repl),
  )
  single = jax.jit(step)  # Everything on the default device.
  state0 = state_lib.make_train_state(
    params, model_state, tx, jax.random.PRNGKey(1), ema=False
  )
  runs = {
    'sharded': (sharded, mesh_lib.replicate(state0, mesh), batch),
    'single': (single, state0, batch),
    'local': (single, state0, {k: v[:2] for k, v in batch.items()}),
  }
  arrays = {}
  for name, (fn, state, rows) in runs.items():
    for _ in range(2):
      state, _ = fn(state, rows)
    state = jax.device_get(state)
    arrays.update(_flat(f'{name}/params', state.params))
    arrays.update(_flat(f'{name}/state', state.model_state))
  np.savez(out, **arrays)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--cache_dir', default='')
  parser.add_argument('--set', action='append', default=[])
  parser.add_argument('--bn_step_check', action='store_true')
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = ' '.join(
    [
      os.environ.get('XLA_FLAGS', ''),
      f'--xla_force_host_platform_device_count={args.devices}',
      # The compile-speed flags (-O0, elemental emitters) come from the
      # test process's XLA_FLAGS (tests/conftest.py).
    ]
  )
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if args.bn_step_check:
    bn_step_check(args.out)
    return
  config = tiny_config(args.cache_dir)
  # What these runs test is the device and process split, not the loader
  # (the loop tests run the tf.data one, in-process); without TensorFlow
  # each run starts about 6 s of CPU sooner on 2 cores.
  config.data.loader = 'python'
  if args.num_processes > 1:
    dist = config.train.distributed
    dist.enabled = True
    dist.coordinator_address = f'localhost:{args.port}'
    dist.num_processes = args.num_processes
    dist.process_id = args.process_id
  _apply_overrides(config, args.set)

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from nfnets.train import train_and_evaluate  # noqa: PLC0415

  result = train_and_evaluate(config, args.workdir)
  if args.devices > 1 and args.num_processes == 1:
    _check_bad_batch_size(config)
  if jax.process_index() == 0 and args.out:
    params = jax.device_get(result.state.params)
    flat = {
      f'{m}/{n}': np.asarray(v) for m, d in params.items() for n, v in d.items()
    }
    np.savez(
      args.out,
      losses=np.asarray(_losses(args.workdir)),
      step=int(result.state.step),
      eval_top1=result.metrics.get('eval/top1', np.nan),
      preempted=result.preempted,
      **{'params/' + k: v for k, v in flat.items()},
    )


if __name__ == '__main__':
  main()
