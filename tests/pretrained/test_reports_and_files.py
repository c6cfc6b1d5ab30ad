"""Mismatch reports stay short; written weights files follow the umask."""

import json
import os
import re

import numpy as np
import pytest

from nfnets import pretrained
from nfnets.pretrained import inference, loading, timm_interop

TINY = dict(width=0.125, depth=(1, 1, 1, 1))


@pytest.fixture(scope='module')
def tiny_params():
  shapes = pretrained.expected_shapes('F0', 10, **TINY)
  return {
    m: {n: np.zeros(s, np.float32) for n, s in v.items()}
    for m, v in shapes.items()
  }


def test_wrong_variant_report_lists_a_few_problems_and_counts_the_rest(
  tiny_params, tmp_path
):
  path = tmp_path / 'w.safetensors'
  pretrained.save_params(tiny_params, path)
  with pytest.raises(pretrained.PretrainedMismatchError) as err:
    pretrained.load(path, 'F0+', **TINY)
  lines = str(err.value).splitlines()
  # The count, re-derived by hand: F0+ (wider stem and blocks) against the
  # F0 shapes in the file.
  want = {
    f'{m}/{n}': s
    for m, v in pretrained.expected_shapes('F0+', 10, **TINY).items()
    for n, s in v.items()
  }
  got = {
    f'{m}/{n}': x.shape for m, v in tiny_params.items() for n, x in v.items()
  }
  total = len(want.keys() ^ got.keys()) + sum(
    want[k] != got[k] for k in want.keys() & got.keys()
  )
  assert total > loading.MAX_LISTED_PROBLEMS
  assert f'{total} problems' in lines[0]
  details = lines[1:]
  assert len(details) == loading.MAX_LISTED_PROBLEMS + 1
  assert all(
    re.match(r'  (missing|unexpected|shape): ', d) for d in details[:-1]
  )
  assert details[-1] == f'  ... and {total - loading.MAX_LISTED_PROBLEMS} more'


def test_short_reports_list_every_problem():
  problems = [f'missing: p{i}' for i in range(3)]
  assert loading.format_problems(problems) == ''.join(
    f'\n  missing: p{i}' for i in range(3)
  )
  assert loading.format_problems([]) == ''


@pytest.mark.parametrize('umask', [0o022, 0o002, 0o077])
def test_weights_files_follow_the_umask(tiny_params, tmp_path, umask):
  old = os.umask(umask)
  try:
    pretrained.save_params(tiny_params, tmp_path / 'w.safetensors')
    pretrained.save_params(tiny_params, tmp_path / 'w.npz')
    timm_interop.save_timm(tiny_params, tmp_path / 'timm.safetensors')
  finally:
    os.umask(old)
  for name in ('w.safetensors', 'w.npz', 'timm.safetensors'):
    mode = os.stat(tmp_path / name).st_mode & 0o777
    assert mode == 0o666 & ~umask, (name, oct(mode))


def test_a_file_of_another_model_is_refused_by_name(tiny_params, tmp_path):
  path = tmp_path / 'run.safetensors'
  pretrained.save_params(tiny_params, path, {'model': 'NF_ResNet'})
  with pytest.raises(ValueError, match='holds the params of a NF_ResNet'):
    inference.model_spec(str(path), None, None)
  pretrained.save_params(tiny_params, path, {'model': 'NFNet', 'variant': 'F1'})
  assert inference.model_spec(str(path), None, None) == ('F1', {})


def test_a_safetensors_header_size_starting_with_the_pickle_byte(tmp_path):
  """The header's size is little-endian: 1 file in 256 starts with 0x80."""
  from nfnets.pretrained import formats

  params = {'m': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  path = tmp_path / 'w.safetensors'
  for pad in range(256):
    pretrained.save_params(params, path, {'note': 'x' * pad})
    if path.read_bytes()[:1] == b'\x80':
      break
  assert path.read_bytes()[:1] == b'\x80'
  assert formats.sniff_format(path) == 'safetensors'
  loaded, metadata = pretrained.read_params(path)
  np.testing.assert_array_equal(loaded['m']['w'], params['m']['w'])
  assert metadata['note'] == 'x' * pad


def _run_file(params, path, **metadata):
  """A weights file as `convert_weights --workdir` writes one."""
  meta = {
    'model': 'NFNet', 'variant': 'F0', 'model_kwargs': json.dumps(TINY),
    'class_names': json.dumps([f'c{i}' for i in range(10)]),
    'image_size': '32', 'eval_preproc': 'resize', 'source': 'a run',
  }  # fmt: skip
  pretrained.save_params(params, path, {**meta, **metadata})
  return str(path)


def test_unknown_model_kwargs_are_named_before_weights_are_read(
  tiny_params, tmp_path
):
  path = _run_file(tiny_params, tmp_path / 'w.safetensors')
  with pytest.raises(ValueError, match="'widht'.*width") as err:
    inference.model_spec(path, None, {'widht': 0.125})
  assert 'depth' in str(err.value) and 'num_classes' not in str(err.value)
  with pytest.raises(ValueError, match="'variant'.*--variant"):
    inference.model_spec(path, None, {'variant': 'F1'})
  # The check comes first: this file does not exist.
  with pytest.raises(ValueError, match="'widht'"):
    pretrained.load(tmp_path / 'none.npz', 'F0', widht=0.125)


def test_model_kwargs_update_the_files_own(tiny_params, tmp_path):
  path = _run_file(tiny_params, tmp_path / 'w.safetensors')
  variant, kwargs = inference.model_spec(path, None, {'grouped_conv': 'split'})
  assert variant == 'F0'
  assert kwargs == {
    'width': 0.125,
    'depth': [1, 1, 1, 1],
    'grouped_conv': 'split',
  }
  pretrained.load(path, variant, **kwargs)


def test_a_width_mismatch_points_at_model_kwargs(tiny_params, tmp_path):
  path = _run_file(tiny_params, tmp_path / 'w.safetensors')
  with pytest.raises(pretrained.PretrainedMismatchError) as err:
    pretrained.load(path, 'F0', width=0.25, depth=(1, 1, 1, 1))
  first = str(err.value).splitlines()[0]
  assert 'records model_kwargs width=0.125 where the model has width=0.25' in (
    first
  )
  assert '--model_kwargs' in first and 'depth' not in first


@pytest.mark.parametrize('to', ['w.npz', 'timm.safetensors'])
def test_converted_files_keep_what_their_source_records(
  tiny_params, tmp_path, to
):
  source = pretrained.read_metadata(
    _run_file(tiny_params, tmp_path / 'src.safetensors')
  )
  metadata = pretrained.carried_metadata(source, variant='F0')
  out = tmp_path / to
  if to.startswith('timm'):
    timm_interop.save_timm(tiny_params, out, metadata)
  else:
    pretrained.save_params(tiny_params, out, metadata)
  got = pretrained.read_metadata(out)
  for key in ('class_names', 'image_size', 'eval_preproc', 'source'):
    assert got[key] == source[key], key
  assert got['format'] == ('pt' if to.startswith('timm') else source['format'])
  # A timm file predicts as its source does: it records the model too.
  assert inference.model_spec(str(out), None, None) == (
    'F0',
    {'width': 0.125, 'depth': [1, 1, 1, 1]},
  )
