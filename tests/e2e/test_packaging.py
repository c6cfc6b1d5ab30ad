"""`pip install .` builds: the wheel holds `nfnets`, its subpackages and data.

Builds a wheel from a copy of the checkout with the environment's own
setuptools (`--no-build-isolation --no-index`: nothing is downloaded) and
compares its contents with the source tree, walked independently.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SKIP = {'runs', 'build', 'pretrained', 'notebooks', 'docs'}


def _copy_checkout(dest):
  for name in os.listdir(ROOT):
    if name.startswith('.') or name in SKIP or name.endswith('.egg-info'):
      continue
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(
        src, dest / name, ignore=shutil.ignore_patterns('__pycache__')
      )
    else:
      shutil.copy(src, dest / name)


@pytest.mark.slow
def test_wheel_has_the_package_its_data_and_the_pins(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  _copy_checkout(src)
  out = tmp_path / 'wheels'
  cmd = [
    sys.executable,
    '-m',
    'pip',
    'wheel',
    '--no-deps',
    '--no-build-isolation',
    '--no-index',
    '-q',
    '-w',
    str(out),
    str(src),
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (wheel,) = os.listdir(out)
  names = zipfile.ZipFile(out / wheel).namelist()

  # Every package directory of the source tree, and nothing else.
  want = sorted(
    os.path.relpath(d, ROOT).replace(os.sep, '.')
    for d, _, files in os.walk(os.path.join(ROOT, 'nfnets'))
    if '__init__.py' in files
  )
  got = sorted(
    os.path.dirname(n).replace('/', '.')
    for n in names
    if n.endswith('/__init__.py')
  )
  assert got == want
  assert 'nfnets.models' in got and 'nfnets.pretrained' in got
  tops = {n.split('/')[0] for n in names if '.dist-info' not in n}
  assert tops == {'nfnets'}
  assert 'nfnets/pretrained/assets/imagenet_classes.txt' in names

  # The runtime pins of requirements.txt are the wheel's dependencies.
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    pins = [line.strip() for line in f if line.strip()[:1].isalnum()]
  meta = next(n for n in names if n.endswith('.dist-info/METADATA'))
  text = zipfile.ZipFile(out / wheel).read(meta).decode()
  deps = [
    line.split(':', 1)[1].strip()
    for line in text.splitlines()
    if line.startswith('Requires-Dist:')
  ]
  assert [_canonical(d) for d in deps] == [_canonical(p) for p in pins]


def _canonical(requirement):
  # PEP 503 names: '_', '.' and '-' are the same, case is not significant.
  return re.sub(r'[-_.]+', '-', requirement).lower()
