"""End-to-end tests of nfnets.train.loop on one device (tiny NFNet, digits).

Multi-device, multi-process and SIGTERM runs are in test_multidevice.py; the
full-size F0 step is in tests/e2e/test_train_f0.py.
"""

import glob
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from nfnets import data, models, optim
from nfnets.train import NonFiniteLossError, init_state, train_and_evaluate
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import mesh as mesh_lib
from tests.support.train_harness import tiny_config

BN_STEPS = 12

TRAIN_KEYS = {
  'train/loss',
  'train/top1',
  'train/top5',
  'train/grad_norm',
  'train/param_norm',
  'train/agc_clip_fraction',
  'train/lr',
  'train/epoch',
}


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _hand_top1(config, params, model_state):
  """Top-1 over the whole eval split in one unpadded batch, by NumPy."""
  info = data.dataset_info(config.data)
  (batch,) = list(
    data.make_eval_iterator(
      config.data, global_batch_size=info.num_eval_examples
    )
  )
  assert batch['mask'].min() == 1.0
  model = models.make_model(config.model, info.num_classes)
  out, _ = model.apply(params, model_state, None, batch['images'], False)
  logits = out['logits']
  return float(np.mean(np.argmax(logits, -1) == batch['labels']))


def test_run_logs_evaluates_checkpoints_and_resumes(
  tmp_path, compilation_cache_dir
):
  workdir = str(tmp_path / 'run')
  config = tiny_config(compilation_cache_dir)
  config.train.num_steps = 4
  config.train.log_every_steps = 2
  config.checkpoint.every_steps = 1
  config.checkpoint.max_to_keep = 2
  config.eval.batch_size = 112  # 360 test digits: 4 batches, 88 padded.
  result = train_and_evaluate(config, workdir)

  assert int(result.state.step) == 4 and not result.preempted
  records = _records(workdir)
  train = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train] == [2, 4]
  assert TRAIN_KEYS <= set(train[0])
  assert all(np.isfinite(r['train/loss']) for r in train)
  evals = [r for r in records if 'eval/top1' in r]
  assert len(evals) == 1 and evals[0]['step'] == 4
  assert evals[0]['eval/num_examples'] == 360
  assert 'eval_ema/top1' in evals[0]
  # Padding is masked out: the same top-1 as one unpadded NumPy pass.
  state = jax.device_get(result.state)
  want = _hand_top1(config, state.params, state.model_state)
  assert evals[0]['eval/top1'] == pytest.approx(want, abs=1e-6)
  assert result.metrics['eval/top1'] == evals[0]['eval/top1']

  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['train']['num_steps'] == 4
  assert saved['model']['kwargs']['width'] == 0.0625
  assert glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.*'))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps == [3, 4]

  # Resuming with a longer schedule continues from step 4, not from 0.
  config.train.num_steps = 6
  resumed = train_and_evaluate(config, workdir)
  assert int(resumed.state.step) == 6
  later = [r['step'] for r in _records(workdir) if 'train/loss' in r]
  assert later == [2, 4, 6]


def test_bn_resnet_trains_evaluates_and_resumes_with_its_statistics(
  tmp_path, compilation_cache_dir
):
  workdir = str(tmp_path / 'bn')
  config = tiny_config(compilation_cache_dir)
  config.model.name = 'ResNet'  # Pre-activation BN-ResNet, 4 blocks.
  config.model.kwargs = ml_collections.ConfigDict(
    dict(width=0.25, depth=(1, 1, 1, 1))
  )
  config.train.batch_size = 32
  config.train.num_steps = BN_STEPS
  config.train.log_every_steps = BN_STEPS
  first = train_and_evaluate(config, workdir)

  state = jax.device_get(first.state)
  stats = state.model_state['ResNet/~/final_bn/~/var_ema']
  assert int(stats['counter']) == BN_STEPS  # One update per train step.
  assert jax.tree.structure(state.ema_model_state) == jax.tree.structure(
    state.model_state
  )
  # Better than chance (0.1) on the 360 held-out digits, with the moving
  # statistics (eval mode), for the raw and the EMA weights.
  assert first.metrics['eval/top1'] > 0.3
  assert first.metrics['eval_ema/top1'] > 0.3

  # Rerunning restores the final checkpoint (nothing left to train): the
  # statistics come back exactly, so the evaluation is the same.
  again = train_and_evaluate(config, workdir)
  restored = jax.device_get(again.state)
  assert int(restored.step) == BN_STEPS
  for name in ('model_state', 'ema_model_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(restored, name),
                 getattr(state, name))  # fmt: skip
  for key in ('eval/top1', 'eval/loss', 'eval_ema/loss'):
    assert again.metrics[key] == first.metrics[key]

  # Fine-tuning from the run (config.model.init_from=<workdir>) for 5
  # classes: its EMA params and EMA statistics (what its eval_ema used),
  # except the classifier, resized and freshly initialised.
  config.model.init_from = workdir
  with pytest.raises(ValueError, match=r'reinit_modules\): NFNet/~/linear\.'):
    _initial_state(config, 5)  # The default names the NFNet's classifier.
  config.model.reinit_modules = ('ResNet/~/linear',)
  lines = []
  tuned = _initial_state(config, 5, log=lines.append)
  config.model.init_from = ''
  fresh = _initial_state(config, 5)
  assert lines == [f'Starting from the EMA params of step 12 of the run in '
                   f'{workdir}.']  # fmt: skip
  classifier = 'ResNet/~/linear'
  assert tuned.params[classifier]['w'].shape[-1] == 5
  jax.tree.map(np.testing.assert_array_equal, tuned.params[classifier],
               fresh.params[classifier])  # fmt: skip
  del tuned.params[classifier], state.ema_params[classifier]
  jax.tree.map(np.testing.assert_array_equal, tuned.params, state.ema_params)
  jax.tree.map(np.testing.assert_array_equal, tuned.model_state,
               state.ema_model_state)  # fmt: skip
  assert int(tuned.step) == 0
  # A resume reads its checkpoint, not init_from (which may be gone).
  config.model.init_from = str(tmp_path / 'gone')
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), max_to_keep=2
  )
  try:
    resumed = _initial_state(config, 10, checkpointer=checkpointer)
  finally:
    checkpointer.close()
  assert int(resumed.step) == BN_STEPS


def _initial_state(config, num_classes, log=print, checkpointer=None):
  """The state a run of `config` on `num_classes` starts from, on the host."""
  model = models.make_model(config.model, num_classes)
  optimizer, _ = optim.make_optimizer(
    config.optimizer, steps_per_epoch=1.0, total_steps=100,
    global_batch_size=config.train.batch_size,
  )  # fmt: skip
  state = init_state.initial_train_state(
    config, mesh=mesh_lib.make_mesh(), model=model, optimizer=optimizer,
    checkpointer=checkpointer, log=log,
  )  # fmt: skip
  return jax.device_get(state)


def test_init_from_a_folder_that_is_not_a_run_says_so(tmp_path):
  config = tiny_config()
  config.model.init_from = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="without a training run's"):
    _initial_state(config, 10)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
  tmp_path, compilation_cache_dir
):
  workdir = str(tmp_path / 'nan')
  config = tiny_config(compilation_cache_dir)
  config.optimizer.name = 'sgd'
  config.optimizer.clipping = 0.0
  # LR 0 for the first step (warmup), then one that overflows the weights.
  config.optimizer.lr = 1e38
  config.optimizer.warmup_steps = 1
  config.train.num_steps = 6
  config.train.log_every_steps = 3
  config.checkpoint.every_steps = 1
  with pytest.raises(
    NonFiniteLossError, match=r'Non-finite loss at step 2 '
  ) as e:
    train_and_evaluate(config, workdir)
  assert 'last good checkpoint (step 1)' in str(e.value)
  kept = [d for d in os.listdir(os.path.join(workdir, 'checkpoints'))]
  assert [d for d in kept if d.isdigit()] == ['1']


def test_unknown_model_name_lists_valid_ones(tmp_path):
  config = tiny_config()
  config.model.name = 'NFNett'
  with pytest.raises(ValueError, match=r"valid names: \['NFNet'"):
    train_and_evaluate(config, str(tmp_path))


def _truncate_an_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'))
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_resume_past_a_damaged_checkpoint_keeps_one_record_per_step(
  tmp_path, compilation_cache_dir, capsys
):
  workdir = str(tmp_path / 'run')
  config = tiny_config(compilation_cache_dir)  # 6 steps, logged each step.
  config.checkpoint.every_steps = 3
  first = train_and_evaluate(config, workdir)
  first_eval = _records(workdir)[-1]
  assert first_eval['step'] == 6 and 'eval/top1' in first_eval
  _truncate_an_array_file(os.path.join(workdir, 'checkpoints', '6'))
  capsys.readouterr()

  # Falls back to step 3 and trains 4..6 again: the same steps, the same
  # data ('skip') and per-step randomness, so the same final state.
  again = train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f'{workdir}/checkpoints/6 is damaged' in out
  assert 'Resuming from' in out and 'at step 3.' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints.damaged', '6'))
  for a, b in zip(
    jax.tree.leaves(jax.device_get(first.state.params)),
    jax.tree.leaves(jax.device_get(again.state.params)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  records = _records(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  eval_steps = [r['step'] for r in records if 'eval/top1' in r]
  assert train_steps == [1, 2, 3, 4, 5, 6] and eval_steps == [6]
  with open(os.path.join(workdir, 'metrics.abandoned.jsonl')) as f:
    aside = [json.loads(line) for line in f]
  assert [r['step'] for r in aside] == [4, 5, 6, 6]
  assert {r['resumed_from_step'] for r in aside} == {3}
  segments = sorted(os.listdir(os.path.join(workdir, 'configs')))
  assert segments == ['segment_000_step_0.json', 'segment_001_step_3.json']

  # A finished run rerun: no second final eval in metrics.jsonl.
  third = train_and_evaluate(config, workdir)
  assert _records(workdir) == records
  assert third.metrics['eval/top1'] == records[-1]['eval/top1']
  out = capsys.readouterr().out
  assert 'not repeated' in out
  assert (
    'Nothing to train: the run is at step 6, this config ends at step 6.'
  ) in out

  # A change to how the run trains is refused, naming it; nothing changes.
  config.optimizer.lr = 0.3
  with pytest.raises(ValueError, match=r'optimizer\.lr: 0\.1 -> 0\.3'):
    train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'configs'))) == segments
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optimizer']['lr'] == 0.1
  # Allowed explicitly, it is recorded.
  train_and_evaluate(config, workdir, allow_config_change=True)
  with open(os.path.join(workdir, 'configs', 'segment_002_step_6.json')) as f:
    assert json.load(f)['changes'] == ['optimizer.lr: 0.1 -> 0.3']


def test_too_small_eval_image_size_fails_before_training(tmp_path):
  config = tiny_config()
  config.data.eval_image_size = 8
  with pytest.raises(ValueError, match='config.data.eval_image_size=8'):
    train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'metrics.jsonl')
  assert not os.listdir(tmp_path / 'checkpoints')
  # A model config no size can build is named as such, not as the eval size.
  config = tiny_config()
  config.model.kwargs.depth = (1, 1)
  with pytest.raises(
    ValueError, match=r'^config\.model cannot be built.*depth'
  ):
    train_and_evaluate(config, str(tmp_path / 'depth'))


def test_warmup_longer_than_the_run_names_the_setting(tmp_path):
  from configs import quickstart  # noqa: PLC0415

  config = quickstart.get_config()
  config.train.num_steps = 4
  with pytest.raises(ValueError, match=r'config\.optimizer\.warmup_epochs'):
    train_and_evaluate(config, str(tmp_path))
