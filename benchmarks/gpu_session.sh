#!/usr/bin/env bash
# Everything that needs a GPU, grouped so each group fits one device call (10-minute limit, at most
# 8 files back from $OUT):
#   bash benchmarks/gpu_session.sh attention    # GPU kernel tests + attention benchmark (~8 min)
#   bash benchmarks/gpu_session.sh estimators   # estimator tests + estimation-cost benchmark (~4 min)
#   bash benchmarks/gpu_session.sh canary       # train the canary (7 min) + evaluation sweep (~3 min)
# Results land under ${OUT:-results}; the canary comes back as canary.tgz (unpack it into
# src/sparse_attn/eval/canary). Copy the tables into docs/benchmarks.md with the device and date.
set -uo pipefail
export PYTHONPATH=src TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
out=${OUT:-results}
mkdir -p "$out"
for step in "${@:-attention}"; do
  case $step in
    attention)
      python3 -m pytest -q -p no:cacheprovider tests/test_triton.py -x 2>&1 | tail -3
      python3 benchmarks/bench_attention.py --lengths 8192 32768 131072 --out "$out/attention" ;;
    estimators)
      python3 -m pytest -q -p no:cacheprovider tests/test_methods.py -x 2>&1 | tail -3
      python3 benchmarks/bench_estimators.py --lengths 32768 131072 --out "$out/estimators" ;;
    canary)
      work=$(mktemp -d)
      python3 -m sparse_attn train-canary --out "$work/canary" --minutes 7 --seq-len 8192 | tail -20
      tar czf "$out/canary.tgz" -C "$work" canary
      python3 -m sparse_attn eval --model "$work/canary" --lengths 2048,4096,8192 --samples 4 \
        --methods xattention,flexprefill,vertical_slash,pooled_topp,oracle --out "$out/eval" ;;
    *) echo "unknown step $step (attention, estimators, canary)" ;;
  esac
done
