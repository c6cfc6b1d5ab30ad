"""Mismatch reports stay short; written weights files follow the umask."""

import os
import re

import numpy as np
import pytest

from nfnets import pretrained
from nfnets.pretrained import loading, timm_interop

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
