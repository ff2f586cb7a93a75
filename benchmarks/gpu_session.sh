#!/usr/bin/env bash
# Everything that needs a GPU, grouped so each group fits one device call (10-minute limit, at most
# 8 files back from $OUT). Each step has its own time box, and every benchmark writes its JSON row
# by row, so a step cut short still returns what it measured.
#   bash benchmarks/gpu_session.sh attention    # GPU kernel tests + attention benchmark at 128K (~8 min)
#   bash benchmarks/gpu_session.sh estimators   # estimation-cost benchmark, Triton vs torch steps (~6 min)
#   bash benchmarks/gpu_session.sh canary       # train the canary (6 min) + evaluation sweep at 8K (~2 min)
#   bash benchmarks/gpu_session.sh pending      # the pending backward patch: tests + fwd/bwd at 32K (~4 min)
# Results land under ${OUT:-results}; the canary comes back as canary.tgz (unpack it into
# src/sparse_attn/eval/canary). Copy the tables into docs/benchmarks.md with the device and date.
set -uo pipefail
export PYTHONPATH=src TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
out=${OUT:-results}
mkdir -p "$out"
for step in "${@:-attention}"; do
  case $step in
    attention)
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py -x 2>&1 | tail -3
      timeout 400 python3 benchmarks/bench_attention.py --lengths 131072 --out "$out/attention128k" ;;
    estimators)
      timeout 420 python3 benchmarks/bench_estimators.py --lengths 131072 32768 --out "$out/estimators" ;;
    canary)
      work=$(mktemp -d)
      timeout 450 python3 -m sparse_attn train-canary --out "$work/canary" --minutes 6 --seq-len 8192 \
        --eval-samples 16 2>&1 | grep -v "^train-canary" | tee "$out/train.log" | tail -40
      tar czf "$out/canary.tgz" -C "$work" canary
      timeout 120 python3 -m sparse_attn eval --model "$work/canary" --lengths 8192 --samples 2 \
        --methods xattention,flexprefill,vertical_slash,oracle --out "$out/eval" ;;
    pending)
      patched=$(mktemp -d)
      cp -r src tests benchmarks pyproject.toml "$patched"/
      (cd "$patched" && git apply benchmarks/pending/backward_mask_skip.patch) || { echo "patch does not apply"; continue; }
      (cd "$patched" && timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py -x 2>&1 | tail -3)
      (cd "$patched" && timeout 200 python3 benchmarks/bench_attention.py --lengths 32768 \
        --densities 1.0 0.2 0.05 --out "$out/attention_pending") ;;
    *) echo "unknown step $step (attention, estimators, canary, pending)" ;;
  esac
done
