"""nfnets.train.run_weights: a run's dataset record and weights metadata.

The end-to-end uses (predict, export and convert_weights with the dataset
gone; fine-tuning from a run) are in tests/e2e/test_run_workdir.py and
tests/train/test_loop.py.
"""

import dataclasses
import json

import pytest

from configs import quickstart
from nfnets import data
from nfnets.train import run_weights

PHOTOS = data.DatasetInfo(
  num_classes=3,
  num_train_examples=48,
  num_eval_examples=12,
  class_names=('daisy', 'rose', 'tulip'),
  natural_images=True,
)


def test_dataset_record_round_trips(tmp_path):
  config = quickstart.get_config()
  digits = data.dataset_info(config.data)
  assert not digits.natural_images  # 8x8 digits: resized whole.
  for info in (PHOTOS, digits):
    run_weights.write_dataset_record(str(tmp_path), config.data, info)
    assert run_weights.read_dataset_record(str(tmp_path)) == info
  record = json.loads((tmp_path / 'dataset.json').read_text())
  assert record['name'] == 'digits'
  assert record['class_names'] == [str(i) for i in range(10)]


def test_a_resume_on_changed_classes_names_them(tmp_path):
  # A class folder added to any split: was a checkpoint shape error that
  # told the user to run with the config the run was trained with.
  workdir = str(tmp_path)
  run_weights.check_same_classes(workdir, PHOTOS)  # No record: a new run.
  run_weights.write_dataset_record(
    workdir, quickstart.get_config().data, PHOTOS
  )
  run_weights.check_same_classes(workdir, PHOTOS)
  grown = dataclasses.replace(
    PHOTOS, num_classes=4, class_names=('daisy', 'iris', 'rose', 'tulip')
  )
  with pytest.raises(ValueError, match=r"4 classes.* 3 .*new \['iris'\]"):
    run_weights.check_same_classes(workdir, grown)


def test_the_record_stands_in_for_a_missing_dataset(tmp_path):
  config = quickstart.get_config()
  # No record (a run from before it existed): the dataset is read.
  assert run_weights.run_dataset_info(config, str(tmp_path)) == (
    data.dataset_info(config.data)
  )
  config.data.name = 'folder'
  config.data.folder_root = str(tmp_path / 'gone')
  with pytest.raises(FileNotFoundError, match='folder_root'):
    run_weights.run_dataset_info(config, str(tmp_path))
  run_weights.write_dataset_record(str(tmp_path), config.data, PHOTOS)
  assert run_weights.run_dataset_info(config, str(tmp_path)) == PHOTOS


@pytest.mark.parametrize(
  'text, problem',
  [
    ('{"num_classes": 3, "class_na', 'JSONDecodeError'),
    ('{"num_classes": 3}', "KeyError: 'class_names'"),
  ],
)
def test_an_unreadable_record_is_named(tmp_path, text, problem):
  (tmp_path / 'dataset.json').write_text(text)
  with pytest.raises(ValueError, match=problem) as error:
    run_weights.read_dataset_record(str(tmp_path))
  assert str(tmp_path / 'dataset.json') in str(error.value)
  assert 'rewrites it when the run is resumed' in str(error.value)


def test_a_record_whose_names_and_count_disagree_is_refused(tmp_path):
  config = quickstart.get_config()
  run_weights.write_dataset_record(str(tmp_path), config.data, PHOTOS)
  record = json.loads((tmp_path / 'dataset.json').read_text())
  record['num_classes'] = 4
  (tmp_path / 'dataset.json').write_text(json.dumps(record))
  with pytest.raises(
    ValueError, match='names 3 classes but records num_classes=4'
  ):
    run_weights.read_dataset_record(str(tmp_path))


@pytest.mark.parametrize(
  'info, eval_preproc', [(PHOTOS, 'resize_crop_32'), (None, 'resize')]
)
def test_weights_metadata_describes_the_model_and_its_inputs(
  info, eval_preproc
):
  config = quickstart.get_config()
  info = info or data.dataset_info(config.data)
  run = run_weights.RunParams({}, {}, 7, 'raw', config, info)
  metadata = run_weights.weights_metadata(run)
  assert all(isinstance(v, str) for v in metadata.values())
  assert metadata['model'] == 'NFNet' and metadata['variant'] == 'F0'
  kwargs = json.loads(metadata['model_kwargs'])
  want = {k: v for k, v in config.model.kwargs.items() if k != 'variant'}
  assert kwargs == json.loads(json.dumps(want))  # Tuples become lists.
  assert json.loads(metadata['class_names']) == list(info.class_names)
  assert metadata['num_classes'] == str(info.num_classes)
  assert metadata['image_size'] == str(config.data.eval_image_size)
  assert metadata['eval_preproc'] == eval_preproc
  assert metadata['source'] == 'the raw params of step 7 of a run of digits'


def test_batchnorm_statistics_do_not_fit_a_weights_file():
  config = quickstart.get_config()
  config.model.name = 'ResNet'
  stats = {'ResNet/~/final_bn/~/var_ema': {'average': [1.0]}}
  run = run_weights.RunParams({}, stats, 7, 'ema', config, PHOTOS)
  with pytest.raises(ValueError, match='A ResNet keeps BatchNorm statistics'):
    run_weights.weights_metadata(run)
