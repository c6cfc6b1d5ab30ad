"""Tests for research.spp: the shapes of signal-propagation curves at init.

Expectations are the analytic ones of the NF-ResNet paper: with skip gains
at 1, an NF-ResNet's residual stream variance grows by alpha^2 per block and
is reset to about 1 + alpha^2 by each transition block; an unnormalised
ResNet with He init doubles its variance with every block.
"""

import csv
import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from nfnets.research import spp

ALPHA = 0.2
R50_STARTS = (0, 3, 7, 13)


@pytest.fixture(scope='module')
def images():
  return spp.gaussian_images(8, 64, seed=0)


@pytest.fixture(scope='module')
def nf_resnet50(images):
  name, kwargs = spp.get_spp_model('nf_resnet50')
  return spp.compute_spp(name, kwargs, images)


@pytest.fixture(scope='module')
def unnormalized_resnet50(images):
  name, kwargs = spp.get_spp_model('unnormalized_resnet50')
  return spp.compute_spp(name, kwargs, images)


def test_nf_resnet50_variance_bounded_and_reset(nf_resnet50):
  result = nf_resnet50
  assert result.num_blocks == 16
  assert result.transitions == R50_STARTS
  var = result.avg_var[1:]  # Output of block k.
  assert np.all(np.isfinite(var))
  # Bounded: never above the deepest stage's 1 + 6 alpha^2, with slack.
  assert var.max() < 1.0 + 6 * ALPHA**2 + 0.15
  for start in R50_STARTS[1:]:
    # Reset at transitions: a stage's first block output has less variance
    # than the previous stage's last.
    assert var[start] < var[start - 1]
  for start, end in ((3, 7), (7, 13)):
    # Within a stage, block j's output has variance ~ 1 + (j + 1) alpha^2
    # (the last stage is left out: at 2x2 pixels SAME padding shrinks the
    # 3x3 conv outputs).
    expected = 1.0 + ALPHA**2 * np.arange(1, end - start + 1)
    np.testing.assert_allclose(var[start:end], expected, rtol=0.1)
    growth = np.diff(var[start:end])
    assert np.all(growth > 0.4 * ALPHA**2)
    assert np.all(growth < 1.5 * ALPHA**2)
  # Every residual branch is roughly variance preserving at init.
  assert np.all(result.res_avg_var[:14] > 0.6)
  assert np.all(result.res_avg_var < 1.3)


def test_unnormalized_resnet_variance_grows_with_depth(unnormalized_resnet50):
  var = unnormalized_resnet50.avg_var[1:]
  # Each block adds a branch of about the stream's own variance.
  assert np.all(np.diff(var) > 0)
  ratios = var[1:] / var[:-1]
  assert np.median(ratios) > 1.6
  assert var[-1] / var[0] > 1e3


def test_csv_and_plots(tmp_path, nf_resnet50, unnormalized_resnet50):
  results = {'nf': nf_resnet50, 'plain': unnormalized_resnet50}
  path = tmp_path / 'spp.csv'
  spp.write_csv(results, str(path))
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 17
  nf_rows = [r for r in rows if r['model'] == 'nf']
  assert [int(r['transition']) for r in nf_rows].count(1) == 4
  assert float(nf_rows[5]['avg_var']) == pytest.approx(
    nf_resnet50.avg_var[5], rel=1e-5
  )
  back = spp.read_csv(str(path))
  np.testing.assert_allclose(back['nf'].avg_var, nf_resnet50.avg_var, 1e-5)
  assert back['plain'].transitions == R50_STARTS
  png = tmp_path / 'spp.png'
  spp.plot_spp(results, str(png))
  assert os.path.getsize(png) > 1000


def test_spp_from_metrics_and_errors():
  outputs = {
    'avg_sq_mean_0': 0.5,
    'avg_var_0': 2.0,
    'avg_sq_mean_1': 0.1,
    'avg_var_1': 3.0,
    'res_avg_var_0': 1.0,
  }
  result = spp.spp_from_metrics(outputs)
  np.testing.assert_array_equal(result.avg_var, [2.0, 3.0])
  assert result.num_blocks == 1
  with pytest.raises(ValueError, match='return_metrics'):
    spp.spp_from_metrics({'logits': 0})
  with pytest.raises(ValueError, match='nf_resnet50'):
    spp.get_spp_model('nf_resnet51')
  with pytest.raises(ValueError, match='gaussian'):
    spp.load_images('imagenet', 1, 32)
  assert spp.stage_transitions('NF_RegNet', {'variant': 'B0'}) == (0, 1, 4, 10)


def test_short_folder_gives_a_smaller_batch_not_padding(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  photos = [skimage.data.chelsea(), skimage.data.coffee()]
  for i, photo in enumerate(photos + [photos[0][::-1]]):
    path = tmp_path / 'ds' / 'validation' / f'c{i % 2}' / f'{i}.png'
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(photo).resize((40, 30)).save(path)
  images = spp.load_images(
    'folder', 8, 16, folder_root=str(tmp_path / 'ds'), seed=0
  )
  assert images.shape == (3, 16, 16, 3)
  # Photos, not blank padding: every image varies, and no two are equal.
  assert images.reshape(3, -1).std(axis=1).min() > 0.1
  assert len({im.tobytes() for im in images}) == 3
  # The digits test split has 360 images: a larger batch gets all of them.
  digits = spp.load_images('digits', 400, 8)
  assert digits.shape == (360, 8, 8, 3)
  assert digits.reshape(360, -1).std(axis=1).min() > 0.1


def test_run_spp_refuses_bad_arguments_before_computing(tmp_path, images):
  logged = []
  with pytest.raises(ValueError, match='No SPP models given'):
    spp.run_spp([], images, str(tmp_path), log=logged.append)
  assert not os.path.exists(tmp_path / 'spp.csv')  # Not an empty table.
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  with pytest.raises(NotADirectoryError, match='a_file.* is a file'):
    spp.run_spp(['nf_resnet50'], images, str(a_file / 'sub'), log=logged.append)
  assert logged == []  # Nothing was computed.


def test_an_outdir_of_another_run_is_refused(tmp_path, images, nf_resnet50):
  # A run with other models left the earlier run's plots beside its CSV.
  outdir = str(tmp_path)
  logged = []
  spp.run_spp(['nf_resnet50'], images, outdir, log=logged.append)
  back = spp.read_csv(os.path.join(outdir, 'spp.csv'))['nf_resnet50']
  np.testing.assert_allclose(back.avg_var, nf_resnet50.avg_var, rtol=1e-5)
  logged.clear()
  with pytest.raises(ValueError) as error:
    spp.run_spp(['bn_resnet50_v2'], images, outdir, log=logged.append)
  assert str(error.value) == (
    f'{outdir} holds the SPPs of another run (other settings: models '
    "['nf_resnet50'] -> ['bn_resnet50_v2']); write this one to another "
    '--outdir.'
  )
  with pytest.raises(ValueError, match=r'seed 0 -> 1\)'):
    spp.run_spp(['nf_resnet50'], images, outdir, seed=1, log=logged.append)
  assert logged == []  # Refused before computing anything.
  assert sorted(os.listdir(outdir)) == [
    'spp.csv', 'spp_nf_resnet50.png', 'spp_settings.json'
  ]  # fmt: skip
  settings = spp.settings_record(
    ['nf_resnet50'], seed=0, skip_gain=1.0, inputs={'images': [8, 64, 64, 3]}
  )
  with open(os.path.join(outdir, spp.SETTINGS_FILE)) as f:
    assert json.load(f) == settings
  spp.check_outdir(outdir, settings)  # The same run may write again.
  # An spp.csv without the record (an older run's) is another run too.
  os.remove(os.path.join(outdir, spp.SETTINGS_FILE))
  with pytest.raises(ValueError, match='no readable spp_settings.json says'):
    spp.check_outdir(outdir, settings)
