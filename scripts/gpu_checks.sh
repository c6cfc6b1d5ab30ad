#!/usr/bin/env bash
# The GPU measurements the docs ask for, on an H100 (each step has its
# own time limit; a step that fails or runs out
# of time is reported and the next one runs):
#
#   1. NFNet-F0, batch 32, bf16: the train step with a float batch and with
#      the recipe's augmentation on the device (docs/data.md: the device
#      augmentation's share of the step);
#   2. the paper's Table 3 models at batch 32 (docs/performance.md, "The
#      paper's Table 3 models, and why NFNets are not faster"):
#      `experiments.benchmark --table=paper`;
#   3. the end-to-end trainer: `experiments.train` with the F0 config and
#      its full recipe at batch 32 on a synthetic ImageNet-like folder of
#      JPEGs (scripts/write_synthetic_folder.py), with the TensorFlow-free
#      input loader when TensorFlow is absent; scripts/train_rate.py prints
#      its steady images/s as a fraction of step 1's (augment=device) and
#      its input_wait (docs/performance.md, "On a GPU, against PyTorch,
#      and the input pipeline");
#   4. timm's dm_nfnet_f0 and f1 at batch 32 in bf16, eager and
#      torch.compile, where torch and timm are installed
#      (scripts/bench_timm.py), and ours, F0 and F1 at batch 32 in bf16,
#      in the same run;
#   5. (only when CHECKS names it) NFNet-F0, batch 32, bf16: the train step
#      without SAM, with SAM on every row and in the paper's form
#      (docs/optim.md: what SAM costs).
#
#   scripts/gpu_checks.sh [DIR]            # results into DIR (gpu_checks)
#   CHECKS="augment e2e" scripts/gpu_checks.sh   # only some of them
#
# CHECKS names the checks to run (default "augment e2e timm paper"; e2e
# compares with augment's result, so it needs augment in the same run).
# All four take about 17 minutes on an H100. The step limits keep
# "augment e2e" and "timm" each under 10 minutes (9.8 and 9.7 at most),
# so where one command may run 10 minutes, run those two, then "paper".
#
# Nothing here needs TensorFlow. On a GPU image with jax, optax, chex
# and orbax but without dm-haiku, ml-collections and jmp, put their wheels
# in .whl/ first (on a machine with the package registry:
#   pip download --no-deps -d .whl dm-haiku==0.0.17 ml-collections==1.1.0 \
#     jmp==0.0.4
# ) and this script installs them. PYTHON picks the interpreter (default:
# python3, else python).
#
# The e2e check trains into E2E_WORKDIR (default /tmp/nfnets_e2e) and
# deletes it first only when this script made it (it holds the marker file
# .gpu_checks_e2e); a folder with anything else in it, such as a real run,
# is left alone and the check is skipped. Relative paths (DIR, E2E_DATA,
# E2E_WORKDIR) are taken from where the script is called; it runs from the
# repository root.
set -uo pipefail

absolute() { [[ "$1" == /* ]] && echo "$1" || echo "${PWD}/$1"; }
dest="$(absolute "${1:-gpu_checks}")"
python="${PYTHON:-$(command -v python3 || command -v python)}"
[[ "${python}" == */* ]] && python="$(absolute "${python}")"
synth="$(absolute "${E2E_DATA:-/tmp/nfnets_synth}")"
e2e="$(absolute "${E2E_WORKDIR:-/tmp/nfnets_e2e}")"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
mkdir -p "${dest}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "${python}" -m pip install --quiet --no-deps .whl/*.whl \
    >"${dest}/pip.log" 2>&1 || echo "pip install failed: ${dest}/pip.log"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >"${dest}/gpu.txt" 2>&1

checks=" ${CHECKS:-augment e2e timm paper} "
want() { [[ "${checks}" == *" $1 "* ]]; }

failed=0
step() {  # step NAME LIMIT_S COMMAND...: runs one check, logs to DIR/NAME.log
  local name="$1" limit="$2"
  shift 2
  local start=$(date +%s)
  timeout "${limit}" "$@" >"${dest}/${name}.log" 2>&1
  local rc=$?
  echo "${name}: exit ${rc} after $(( $(date +%s) - start )) s" \
    | tee -a "${dest}/gpu.txt"
  [[ ${rc} -eq 0 ]] || failed=1
}

want sam && step sam 240 "${python}" -m experiments.benchmark \
  --model=NFNet:F0 --batch_size=32 --steps=20 --forward_steps=0 \
  --sam=off,sync,paper --json_out="${dest}/sam.json"
want augment && step augment 180 "${python}" -m experiments.benchmark \
  --model=NFNet:F0 --batch_size=32 --steps=20 --forward_steps=0 \
  --augment=none,device --json_out="${dest}/augment.json"
want paper && step paper_table 330 "${python}" -m experiments.benchmark \
  --table=paper --steps=20 --plot_out="${dest}/flops_vs_time.png" \
  --json_out="${dest}/paper_table.json"
marker=".gpu_checks_e2e"  # In E2E_WORKDIR: this script made it.
e2e_workdir_ready() {  # Empties E2E_WORKDIR if it is ours; else refuses.
  if [[ -e "${e2e}" && ! -f "${e2e}/${marker}" ]]; then
    if [[ ! -d "${e2e}" || -n "$(ls -A "${e2e}")" ]]; then
      echo "e2e: skipped: E2E_WORKDIR=${e2e} holds files this script did" \
        "not write (no ${marker}); set E2E_WORKDIR to a new folder." \
        | tee -a "${dest}/gpu.txt"
      return 1
    fi
  fi
  rm -rf "${e2e}" && mkdir -p "${e2e}" && touch "${e2e}/${marker}"
}
if want e2e && ! e2e_workdir_ready; then
  failed=1
elif want e2e; then
  step e2e_data 90 "${python}" scripts/write_synthetic_folder.py \
    --out="${synth}" --classes=100 --train_per_class=40 --val_per_class=1
  step e2e_train 290 "${python}" -m experiments.train --config=configs/f0.py \
    --workdir="${e2e}" --config.data.name=folder \
    --config.data.folder_root="${synth}" --config.train.batch_size=32 \
    --config.train.num_steps="${E2E_STEPS:-1500}" \
    --config.train.log_every_steps=10 --config.checkpoint.every_steps=0 \
    --config.eval.batch_size=100
  step e2e_rate 30 "${python}" scripts/train_rate.py --workdir="${e2e}" \
    --benchmark_json="${dest}/augment.json" --skip=200
  cp "${e2e}/metrics.jsonl" "${dest}/e2e_metrics.jsonl" 2>/dev/null
fi
if want timm && "${python}" -c 'import timm, torch' 2>/dev/null; then
  # Ours beside timm's, on the same card in the same run (bf16 by default
  # on an accelerator; each variant at its train resolution).
  step ours_f0_f1 180 "${python}" -m experiments.benchmark \
    --model=NFNet:F0,NFNet:F1 --batch_size=32 --steps=20 --forward_steps=0 \
    --json_out="${dest}/ours_f0_f1.json"
  for model in dm_nfnet_f0 dm_nfnet_f1; do
    size=$([[ ${model} == dm_nfnet_f0 ]] && echo 192 || echo 224)
    step "timm_${model}_eager" 60 "${python}" scripts/bench_timm.py \
      --model="${model}" --batch_size=32 --image_size="${size}" \
      --dtype=bfloat16 --steps=20
    step "timm_${model}_compile" 140 "${python}" scripts/bench_timm.py \
      --model="${model}" --batch_size=32 --image_size="${size}" \
      --dtype=bfloat16 --steps=20 --compile
  done
fi
cat "${dest}/e2e_rate.log" 2>/dev/null
grep -h -A8 '^| Model' "${dest}"/*.log 2>/dev/null | head -40
exit "${failed}"
