#!/usr/bin/env bash
# Shell helper: downloads DeepMind's released NFNet ImageNet weights (F0-F6,
# Haiku params pickled with dill; read them with nfnets.pretrained.load,
# which never unpickles anything but numpy arrays).
#
#   scripts/download_pretrained.sh            # F0 into ./pretrained
#   scripts/download_pretrained.sh F0 F3 DIR  # several variants into DIR
#
# Sizes: F0 286 MB, F1 531 MB, F2 775 MB, F3 1.0 GB, F4 1.3 GB, F5 1.5 GB,
# F6 1.8 GB (F6 was trained with SAM). Needs internet access; everything
# else in the repository works offline from the downloaded files.
set -euo pipefail

BASE_URL="https://storage.googleapis.com/dm-nfnets"
USAGE="Usage: $0 [F0-F6 ...] [DEST_DIR]  (default: F0 into ./pretrained)"
variants=()
dest=""
for arg in "$@"; do
  upper="${arg^^}"
  if [[ "${upper}" =~ ^F[0-6]$ ]]; then
    variants+=("${upper}")
  elif [[ "${upper}" =~ ^F[0-9]+\+?$ ]]; then
    # Never a folder name: 'F8' would download F0 into ./F8.
    echo "No released weights for ${arg}: DeepMind published F0-F6." >&2
    echo "${USAGE}" >&2
    exit 2
  elif [[ "${arg}" == -h || "${arg}" == --help ]]; then
    sed -n '2,11p' "$0"
    exit 0
  elif [[ "${arg}" == -* ]]; then
    echo "Unknown option ${arg}." >&2
    echo "${USAGE}" >&2
    exit 2
  elif [[ -n "${dest}" ]]; then
    echo "Two destination folders, ${dest} and ${arg}: pass one." >&2
    echo "${USAGE}" >&2
    exit 2
  else
    dest="${arg}"
  fi
done
dest="${dest:-pretrained}"
[[ ${#variants[@]} -eq 0 ]] && variants=(F0)
mkdir -p "${dest}"

for v in "${variants[@]}"; do
  out="${dest}/${v}_haiku.npz"
  if [[ -s "${out}" ]]; then
    echo "${out} exists; skipping (remove it first to download it again)."
    continue
  fi
  echo "Downloading ${BASE_URL}/${v}_haiku.npz -> ${out}"
  # Download to a temporary name so an interrupted transfer never leaves a
  # truncated file under the final name.
  if command -v curl >/dev/null; then
    curl -fL --retry 3 -o "${out}.part" "${BASE_URL}/${v}_haiku.npz"
  else
    wget -q --show-progress -O "${out}.part" "${BASE_URL}/${v}_haiku.npz"
  fi
  mv "${out}.part" "${out}"
done
echo "Done. Load with: nfnets.pretrained.load('${dest}/${variants[0]}_haiku.npz', '${variants[0]}')"
