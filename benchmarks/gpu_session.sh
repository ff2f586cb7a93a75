#!/usr/bin/env bash
# Everything that needs a GPU, in one device call (about 25 minutes on an H100 if run whole;
# pass step names to run a subset: tests attention estimators canary eval).
# Results land under ${OUT:-results}; copy tables into docs/benchmarks.md with the device and date.
set -uo pipefail
export PYTHONPATH=src TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
out=${OUT:-results}
mkdir -p "$out"
steps=${*:-tests attention estimators canary eval}
for step in $steps; do
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_methods.py -x 2>&1 | tail -3 ;;
    attention) python3 benchmarks/bench_attention.py --lengths 8192 32768 131072 --out "$out/attention" ;;
    estimators) python3 benchmarks/bench_estimators.py --lengths 32768 131072 --out "$out/estimators" ;;
    canary) python3 -m sparse_attn train-canary --out "$out/canary" --minutes 9 --seq-len 8192 | tail -20 ;;
    eval) python3 -m sparse_attn eval --model "$out/canary" --lengths 2048,4096,8192 --samples 8 \
            --methods xattention,flexprefill,vertical_slash,pooled_topp,oracle,sliding_window --out "$out/eval" ;;
    *) echo "unknown step $step" ;;
  esac
done
