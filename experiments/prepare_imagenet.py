r"""Prepares ImageNet (ILSVRC2012) for tfds from the official tar files.

  python -m experiments.prepare_imagenet --manual_dir=/data/ilsvrc \
      --data_dir=/data/tfds

MANUAL_DIR must hold ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
(from image-net.org, after registering). Nothing is downloaded.
"""

from absl import flags

from experiments import common

_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', None, 'Folder with the ILSVRC2012 tar files.', required=True
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'tfds data dir to write to.', required=True
)


def main(argv):
  del argv
  from nfnets.data import prepare

  prepare.prepare_imagenet(_MANUAL_DIR.value, _DATA_DIR.value)


if __name__ == '__main__':
  common.run(main)
