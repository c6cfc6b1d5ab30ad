"""Tests for nfnets.atomic_files: a file is written whole or not at all.

A failure inside the write (an exception, Ctrl-C) must leave neither a
temporary file nor a changed destination; a complete write replaces it.
"""

import json
import os

import pytest

from nfnets import atomic_files
from nfnets.atomic_files import atomic_output


@pytest.mark.parametrize('error', [ValueError, KeyboardInterrupt])
def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path, error):
  path = tmp_path / 'w.safetensors'
  path.write_bytes(b'the earlier file')
  with pytest.raises(error):
    with atomic_output(path) as tmp:
      with open(tmp, 'wb') as f:
        f.write(b'half of a new file')
      raise error('stopped part way')
  assert os.listdir(tmp_path) == ['w.safetensors']
  assert path.read_bytes() == b'the earlier file'


def test_a_complete_write_replaces_the_file(tmp_path):
  path = tmp_path / 'w.npz'
  path.write_bytes(b'old')
  with atomic_output(str(path)) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path)  # Renamed, never copied.
    with open(tmp, 'wb') as f:
      f.write(b'new')
  assert os.listdir(tmp_path) == ['w.npz']
  assert path.read_bytes() == b'new'


def test_a_directory_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(IsADirectoryError) as error:
    with atomic_output(tmp_path):
      pytest.fail('the write ran')
  assert str(error.value) == (
    f"'{tmp_path}' is a directory; name a file in it to write to."
  )
  assert os.listdir(tmp_path) == []


def test_text_and_json_are_written_whole_with_their_extension_kept(tmp_path):
  path = tmp_path / 'results.csv'
  atomic_files.write_text(path, 'a,b\r\n1,2\r\n')
  assert path.read_bytes() == b'a,b\r\n1,2\r\n'  # Newlines as given.
  atomic_files.write_json(tmp_path / 'r.json', {'b': 1, 'a': (2, 3)})
  assert json.loads((tmp_path / 'r.json').read_text()) == {'b': 1, 'a': [2, 3]}
  assert (tmp_path / 'r.json').read_text().endswith('}\n')
  assert sorted(os.listdir(tmp_path)) == ['r.json', 'results.csv']
  with atomic_output(tmp_path / 'plot.png') as tmp:
    assert tmp.endswith('.png') and os.path.dirname(tmp) == str(tmp_path)
    with open(tmp, 'wb') as f:
      f.write(b'png')
  assert (tmp_path / 'plot.png').read_bytes() == b'png'
