#!/usr/bin/env bash
# Shell helper around `python -m experiments.prepare_imagenet`: prepares
# ImageNet (ILSVRC2012) for tfds, once, from the official tar files.
#
#   scripts/prepare_imagenet.sh MANUAL_DIR DATA_DIR
#
# MANUAL_DIR holds ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar
# (6.3 GB), downloaded by hand from https://image-net.org/download-images after
# registering; no code can download them. DATA_DIR receives the tfds records
# (imagenet2012/5.1.0/, about 150 GB); afterwards train with
# --config.data.name=imagenet2012 --config.data.data_dir=DATA_DIR.
# Conversion is single-process and takes hours; run it on a machine with the
# disk space, then copy DATA_DIR wherever you train.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 MANUAL_DIR DATA_DIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PY" -m experiments.prepare_imagenet --manual_dir="$1" --data_dir="$2"
