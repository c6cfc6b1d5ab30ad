#!/usr/bin/env bash
# Shell wrapper around `python -m experiments.benchmark`: the paper's GPU
# protocol for NFNet-F0 and F1 (per-device batch 32, bf16, data on the
# device), with what a stalled compile needs to be diagnosed:
# a time limit per model and a `top` sample of the compiler's processes
# (`ptxas`, `python`) every 20 s beside it.
#
#   scripts/gpu_benchmark.sh              # F0 and F1 into ./gpu_benchmark
#   scripts/gpu_benchmark.sh DIR F0 F2    # other variants, into DIR
#
# Writes DIR/<variant>.json (experiments.benchmark's JSON, with init_s and
# the environment), DIR/<variant>.log and DIR/top.log; prints the tables.
# A model whose run passes LIMIT_S seconds (default 300) is stopped and the
# next one runs (the script then exits 1): read top.log for which process
# was busy. PYTHON picks the interpreter (default: python, else python3).
# A relative DIR is taken from where the script is called; it runs from the
# repository root. The H100 table in docs/performance.md was measured this
# way.
set -uo pipefail

absolute() { [[ "$1" == /* ]] && echo "$1" || echo "${PWD}/$1"; }
dest="$(absolute "${1:-gpu_benchmark}")"
shift || true
variants=("$@")
[[ ${#variants[@]} -eq 0 ]] && variants=(F0 F1)
limit="${LIMIT_S:-300}"
# GPU images often have only python3.
python="${PYTHON:-$(command -v python || command -v python3)}"
[[ "${python}" == */* ]] && python="$(absolute "${python}")"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
mkdir -p "${dest}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >"${dest}/gpu.txt" 2>&1 || echo "nvidia-smi not found" >"${dest}/gpu.txt"

sample_top() {
  while true; do
    echo "== $(date +%T)"
    top -b -n1 -w 160 | sed -n '1,5p;7,14p'
    sleep 20
  done
}
sample_top >"${dest}/top.log" 2>&1 &
sampler=$!
trap 'kill ${sampler} 2>/dev/null' EXIT

failed=0
for v in "${variants[@]}"; do
  start=$(date +%s)
  timeout "${limit}" "${python}" -m experiments.benchmark --model=NFNet \
    --variant="${v}" --batch_size=32 --steps=20 \
    --json_out="${dest}/${v}.json" >"${dest}/${v}.log" 2>&1
  rc=$?
  echo "${v}: exit ${rc} after $(( $(date +%s) - start )) s" \
    | tee -a "${dest}/gpu.txt"
  [[ ${rc} -eq 0 ]] || failed=1
  grep -A2 '^| Model' "${dest}/${v}.log" | tail -1 || true
done
exit "${failed}"
