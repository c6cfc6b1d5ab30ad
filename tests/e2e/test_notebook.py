"""Executes notebooks/nfnet_demo.ipynb headless (nbclient) on a tiny model.

The notebook reads its weights path, variant, model kwargs and fine-tuning
budget from `NFNET_*` environment variables; here they point it at a small
generated checkpoint whose classifier is zero apart from a chosen bias, so
the printed top-5 is known in closed form (softmax of the bias). The
fine-tuning cell runs the real recipe for two steps, with SAM and EMA off to
keep the compile short.
"""

import json
import os

import nbclient
import nbformat
import numpy as np
import pytest

from nfnets import pretrained

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'nfnet_demo.ipynb')
TINY = {'width': 0.125, 'depth': [1, 1, 1, 1]}


def _tiny_checkpoint(path):
  shapes = pretrained.expected_shapes('F0', 1000, width=0.125, depth=(1,) * 4)
  rng = np.random.default_rng(0)
  params = {
    m: {n: 0.3 * rng.standard_normal(s, np.float32) for n, s in v.items()}
    for m, v in shapes.items()
  }
  bias = np.zeros(1000, np.float32)
  bias[[281, 285, 967, 504, 968]] = [6.0, 5.0, 4.0, 3.0, 2.0]
  params['NFNet/~/linear']['w'][:] = 0.0
  params['NFNet/~/linear']['b'] = bias
  pretrained.save_params(params, path, {'variant': 'F0'})
  return bias


def _stream_text(cell):
  return ''.join(
    o.get('text', '')
    for o in cell.get('outputs', [])
    if o.output_type == 'stream'
  )


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  weights = tmp_path / 'tiny_f0.safetensors'
  bias = _tiny_checkpoint(weights)
  env = {
    'NFNET_WEIGHTS': str(weights),
    'NFNET_VARIANT': 'F0',
    'NFNET_MODEL_KWARGS': json.dumps(TINY),
    'NFNET_IMAGE_SIZE': '32',
    'NFNET_FINETUNE_STEPS': '2',
    'NFNET_FINETUNE_BATCH': '8',
    'NFNET_FINETUNE_IMAGE_SIZE': '32',
    'NFNET_FINETUNE_OVERRIDES': json.dumps(
      {
        'optimizer.sam_rho': 0.0,
        'optimizer.ema_decay': 0.0,
        'train.compilation_cache_dir': '',  # Nothing written outside tmp.
      }
    ),
    'NFNET_WORKDIR': str(tmp_path / 'finetune'),
    'JAX_PLATFORMS': 'cpu',
    # Test-only: XLA:CPU compiles the 'rbg' PRNG several times faster than
    # threefry, which dominates compiling the trainer's parameter init.
    'JAX_DEFAULT_PRNG_IMPL': 'unsafe_rbg',
    'TF_CPP_MIN_LOG_LEVEL': '2',
  }
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name='python3',
    # Run from notebooks/, as Jupyter started in the repository would.
    resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}},
  )
  client.execute()  # Raises CellExecutionError on any failing cell.

  code = [c for c in nb.cells if c.cell_type == 'code']
  text = '\n'.join(_stream_text(c) for c in code)
  assert 'Model loaded w/ 1.12M params, 1000 classes.' in text
  # Closed-form top-5 for every image: softmax of the bias.
  probs = np.exp(bias - bias.max())
  probs /= probs.sum()
  lines = [
    f'{rank}. {name:<30s} {100 * probs[i]:5.1f}%'
    for rank, (name, i) in enumerate(
      [('tabby cat', 281), ('Egyptian cat', 285), ('espresso', 967)], 1
    )
  ]
  for line in lines:
    assert text.count(line) == 2, line
  # Two figures (predictions, signal propagation) were drawn.
  images = [
    o
    for c in code
    for o in c.get('outputs', [])
    if 'image/png' in o.get('data', {})
  ]
  assert len(images) == 2
  # Fine-tuning ran from the checkpoint with a fresh 10-class classifier.
  assert 'eval/top1' in text
  metrics = [
    json.loads(line)
    for line in (tmp_path / 'finetune' / 'metrics.jsonl')
    .read_text()
    .splitlines()
  ]
  assert metrics[-1]['step'] == 2
  assert 0.0 <= metrics[-1]['eval/top1'] <= 1.0


def _run_cells(cells, folder, timeout=300):
  """Runs `cells` in a fresh kernel started in `folder`; returns its text."""
  nb = nbformat.v4.new_notebook(cells=cells)
  client = nbclient.NotebookClient(
    nb,
    timeout=timeout,
    kernel_name='python3',
    resources={'metadata': {'path': str(folder)}},
  )
  client.execute()
  return '\n'.join(_stream_text(c) for c in nb.cells)


@pytest.mark.slow
def test_setup_cell_finds_the_clone_after_a_restart(tmp_path, monkeypatch):
  # Colab after a restart: a fresh kernel whose working folder is the one
  # holding the clone (/content), not the repository.
  content = tmp_path / 'content'
  content.mkdir()
  os.symlink(ROOT, content / 'nfnets-jax')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  monkeypatch.delenv('NFNETS_REPO_URL', raising=False)
  monkeypatch.delenv('NFNETS_INSTALL', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  setup, backend = [c for c in nb.cells if c.cell_type == 'code'][:2]
  probe = nbformat.v4.new_code_cell(
    'import nfnets\nfrom configs import finetune\n'
    "print('package:', nfnets.__file__)\nprint('cwd:', os.getcwd())"
  )
  clone = content / 'nfnets-jax'
  for _ in range(2):  # The first start, then the restart: the same result.
    text = _run_cells([setup, backend, probe], content)
    assert f'repository: {clone} ' in text
    assert f'package: {clone / "nfnets" / "__init__.py"}' in text
    assert f'cwd: {os.path.realpath(clone)}' in text
    assert 'backend CPU, 1 device(s)' in text


@pytest.mark.slow
def test_setup_cell_without_a_checkout_asks_for_the_address(
  tmp_path, monkeypatch
):
  monkeypatch.delenv('NFNETS_REPO_URL', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  setup = next(c for c in nb.cells if c.cell_type == 'code')
  with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
    _run_cells([setup], tmp_path, timeout=120)
  assert 'Set REPO_URL at the top of this cell' in str(e.value)
  assert 'YOUR_ORG' not in json.dumps(nb)
  assert 'accelerator' not in nb.metadata  # Any runtime, not GPU only.
