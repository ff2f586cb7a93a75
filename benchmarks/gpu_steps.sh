#!/usr/bin/env bash
# GPU benchmarks and GPU tests, grouped in named steps. Usage, from the repository root:
#   bash benchmarks/<this script> STEP [STEP ...]     (default step: attention)
# Each step runs under its own timeout, and every benchmark writes its JSON row by row, so a step
# that is cut short keeps what it measured. Steps and what they measure (approximate run time):
#   kernels      GPU kernel tests, then the forward tile-config sweep at 32K (~9 min)
#   attention    kernels vs Flex and dense SDPA at 128K, every density (~7 min)
#   evidence     estimation cost at 128K and 32K, kernels at 128K, estimator kernel tests (~9.5 min)
#   sustained    128K and 32K rows run back to back for seconds: time, joules per call, SM clock (~6.5 min)
#   graphs       8K rows as CUDA-graph replays, fwd/bwd/fwdbwd (~3.5 min)
#   ncu          Nsight Compute counters of ours and Flex, 32K and 128K at d=0.1 (~4 min)
#   estimators   estimation cost of every method with PyTorch, Triton and one-pass block_mass steps (~6 min)
#   canary       trains the canary base model, 7.5 minutes, and its dense accuracy (~8.5 min)
#   refine       three refine variants of the canary in src/sparse_attn/eval/canary (~9 min)
#   recipe       the canary recipe, part 1: base 5.5 minutes + first refine 2.2 minutes (~9.3 min)
#   recipe_end   the canary recipe, part 2: the last refine, 2.2 minutes (~3.5 min)
#   sweep        evaluation sweep of the shipped canary at 8K, 4K and 2K: accuracy, density, prefill (~8.5 min)
#   seer_8k      the canary at 8K over 720 prompts: dense, seer at threshold 0.006 and seer with the thresholds its
#                profile chose per layer and KV head (docs/results/profile_seer_canary_8k_cpu_2026-12-08.json),
#                with each row's paired difference to dense (~8 min)
#   prefill      canary prefill, patched vs dense flash/cuDNN, at 32K-128K (~5.5 min)
#   attention_dense, attention_moba, attention_nsa
#                the canary base trained 3 minutes with dense, MoBA or NSA attention, then evaluated at
#                2K-8K with its own attention (~8 min each)
#   attention_dsa  DeepSeek Sparse Attention on the shipped dense canary: indexer warm-up 1 minute, sparse
#                training 2 minutes (1024 keys per token), then evaluated at 2K-8K with its own attention (~7 min)
#   gpu_tests    every test marked gpu (~3 min)
#   decode       GPU decode tests, then one decode step vs dense SDPA and Flex, pages of 16, 32 and 64 (~7 min)
#   decode_512k  one decode step at a 512K context, batch 1 and 8, pages of 32 and 64 (~4 min)
#   prefill_8b   prefill of a 2-layer Llama-8B shape at 128K and 32K: dense, methods (fallback auto, auto without
#                the decision cache, never), a static layout at d = 0.1, with attention/estimate/rest split (~5.5 min)
#   decode_bounds  the int8-bounds tests on the GPU, then one decode step at 128K with exact and int8 Quest bounds
#                (pages of 64), and int8 at pages of 32 (~5 min)
#   decode_profile  each kernel of a decode step, the top-k kernel's warps, the attention's splits and
#                pipelining stages, pages 16/32/64 (~2 min)
#   warmup       each method's first-call compile on an 8B-shaped layer at 32K, sparse_attn.warmup with an empty and a
#                filled Triton kernel cache (a restarted process), and the first request after it (~7 min)
#   generate     generate() on an 8B-shaped Llama, dense vs sparse decode, at 32K and 128K, batch 1 and 8 (~5 min)
#   generate_static  the same at 32K with a static cache (transformers compiles the decoding forward) (~5 min)
#   trainable    MoBA and NSA forward and forward+backward vs cuDNN, flash and Flex at 8K/32K/64K, Hkv 8 and 2 (~6 min)
#   nsa_profile  NSA's kernels by GPU time at 32K and 64K, forward and forward+backward, and the selection
#                kernel's tile/warps/stages choices (~2 min)
#   nsa_reads    NSA forward and forward+backward with shared and per-token reads of the selected blocks, on
#                structured and random inputs at 64K and 32K, and the blocks per token and per tile (~6 min)
#   nsa_decode   one NSA decode step at 32K and 128K, kept compression vs compressing the cache, one DSA step,
#                dense (~1.5 min)
#   train_step   a training step of the canary architecture with dense, MoBA, NSA and DSA attention at 8K and 32K:
#                tokens/s (~3 min)
# Results are written under ${OUT:-results}; trained models come back as .tgz archives (unpack one
# into src/sparse_attn/eval/canary to use it). docs/benchmarks.md gives the command behind each table.
set -uo pipefail
export PYTHONPATH=src:. TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
out=${OUT:-results}
mkdir -p "$out"
for step in "${@:-attention}"; do
  case $step in
    kernels)
      # The attention kernel tests take about 4 minutes on an H100.
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/backends/test_triton.py 2>&1 | tail -3
      timeout 240 python3 benchmarks/sweep_kernel_configs.py --kinds fwd --length 32768 --densities 0.02 0.2 \
        --out "$out/fwd_configs32k" ;;
    attention)
      timeout 400 python3 benchmarks/bench_attention.py --lengths 131072 --densities 0.1 0.02 1.0 0.2 0.5 0.05 \
        --out "$out/attention128k" ;;
    evidence)
      # Estimator costs and the 128K attention rows, then the estimator kernel tests on the GPU.
      timeout 200 python3 benchmarks/bench_estimators.py --lengths 131072 --out "$out/estimators128k"
      timeout 80 python3 benchmarks/bench_estimators.py --lengths 32768 --out "$out/estimators32k"
      timeout 200 python3 benchmarks/bench_attention.py --lengths 131072 --densities 0.1 0.02 0.2 1.0 \
        --out "$out/attention128k"
      timeout 60 python3 -m pytest -q -p no:cacheprovider tests/methods/test_methods.py -k "kernel or triton" 2>&1 \
        | tail -3 ;;
    sustained)
      timeout 260 python3 benchmarks/bench_attention.py --lengths 131072 --densities 0.1 0.02 --modes fwd bwd \
        --rounds 2 --sustain 2 --skip-dense-sdpa --out "$out/attention128k_sustained"
      timeout 300 python3 benchmarks/bench_attention.py --lengths 32768 --modes bwd fwdbwd --rounds 2 --sustain 1.5 \
        --skip-dense-sdpa --out "$out/attention32k_sustained" ;;
    graphs)
      timeout 300 python3 benchmarks/bench_attention.py --lengths 8192 --modes fwd bwd fwdbwd --rounds 3 \
        --skip-dense-sdpa --cuda-graphs --out "$out/attention8k_graphs" ;;
    ncu)
      # The .ncu-rep reports (tens of MB each) stay in a temporary directory; their raw pages are
      # written to $out gzipped, and summarized.
      rep=$(mktemp -d)
      for length in 32768 131072; do
        timeout 220 ncu --profile-from-start off --clock-control none --set full -f -o "$rep/attn$length" \
          python3 benchmarks/ncu_attention.py --length $length --density 0.1 2>&1 | grep -v "^==PROF==" | tail -3
        ncu --import "$rep/attn$length.ncu-rep" --page raw --csv > "$out/ncu_attention${length}_raw.csv"
        python3 benchmarks/ncu_attention.py --summarize "$out/ncu_attention${length}_raw.csv"
        gzip -f "$out/ncu_attention${length}_raw.csv"
      done ;;
    estimators)
      timeout 420 python3 benchmarks/bench_estimators.py --lengths 131072 32768 --out "$out/estimators" ;;
    canary)
      # Trains the canary base model (7.5 minutes, no refine), then its dense accuracy on 16 prompts
      # per length; the model comes back as canary.tgz. The curriculum starts with induction
      # episodes at 128 tokens, doubled up to 8K, then lookup episodes at 512 doubled up to 8K.
      work=$(mktemp -d)
      timeout 530 python3 -m tools.canary train --no-refine --out "$work/canary" --minutes 7.5 --seq-len 8192 \
        --eval-samples 16 --workers 6 --probe-every 60 > "$out/train_canary.log" 2>&1
      grep -a "probe\|step" "$out/train_canary.log" | tr -d "\r" | tail -24
      [ -f "$work/canary/config.json" ] || { echo "canary did not finish"; continue; }
      tar czf "$out/canary.tgz" -C "$work" canary
      python3 -c "import json; l=json.load(open('$work/canary/training_log.json')); print(l['induction_steps'], l.get('lookup_steps'), l['steps'], l['dense_accuracy'])" ;;
    refine)
      # Three refine variants (a lookup phase, then the retrieval mix; 2.2 minutes each) on the
      # canary in src/sparse_attn/eval/canary, each followed by its per-task dense accuracy at
      # 2K/4K/8K (10 prompts each); each refined model comes back as refined_<variant>.tgz.
      work=$(mktemp -d)
      for spec in "a:--seed 2 --multi-value-share 0.3" "b:--seed 1 --multi-value-share 0.3" "c:--seed 2 --multi-value-share 0.5"; do
        name=${spec%%:*}
        timeout 190 python3 -m tools.canary refine --out "$work/refined_$name" --minutes 2.2 --workers 6 \
          --no-eval-before --eval-samples 10 ${spec#*:} > "$out/refine_$name.log" 2>&1
        grep -a "lookup@\|mix@" "$out/refine_$name.log" | tail -4
        [ -f "$work/refined_$name/training_log.json" ] || { echo "variant $name did not finish"; continue; }
        python3 -c "import json; l=json.load(open('$work/refined_$name/training_log.json')); print('$name', l['steps'], [(s['length'], s['step'], s['passed']) for s in l['lookup_stages']], 'before', l['before'], 'after', l['after'])"
        tar czf "$out/refined_$name.tgz" -C "$work" "refined_$name"
      done ;;
    recipe)
      # The canary recipe (9.9 minutes of training), part 1: the base, 5.5 minutes, then the first
      # refine (seed 2, no multi-value keys), 2.2 minutes. Comes back as recipe_part1.tgz: unpack it
      # into src/sparse_attn/eval/canary, then run recipe_end for the last 2.2-minute refine.
      work=$(mktemp -d)
      timeout 375 python3 -m tools.canary train --no-refine --out "$work/base" --minutes 5.5 --seq-len 8192 \
        --eval-samples 4 --workers 6 --probe-every 60 > "$out/recipe_base.log" 2>&1
      grep -a "probe" "$out/recipe_base.log" | tr -d "\r" | tail -8
      [ -f "$work/base/config.json" ] || { echo "base did not finish"; continue; }
      python3 -c "import json; l=json.load(open('$work/base/training_log.json')); print('base', l['induction_steps'], l.get('lookup_steps'), l['steps'], l['dense_accuracy'])"
      timeout 200 python3 -m tools.canary refine --init "$work/base" --out "$work/canary" --minutes 2.2 \
        --workers 6 --no-eval-before --eval-samples 4 --seed 2 --multi-value-share 0 > "$out/recipe_refine1.log" 2>&1
      [ -f "$work/canary/training_log.json" ] || { echo "refine 1 did not finish"; continue; }
      python3 -c "import json; l=json.load(open('$work/canary/training_log.json')); print('refine1', l['steps'], 'after', l['after'])"
      cp "$work/base/training_log.json" "$out/recipe_base_training_log.json"
      tar czf "$out/recipe_part1.tgz" -C "$work" canary ;;
    recipe_end)
      work=$(mktemp -d)
      timeout 200 python3 -m tools.canary refine --init canary --out "$work/canary" --minutes 2.2 \
        --workers 6 --no-eval-before --eval-samples 10 --seed 1 --multi-value-share 0.3 > "$out/recipe_refine2.log" 2>&1
      [ -f "$work/canary/training_log.json" ] || { echo "refine 2 did not finish"; continue; }
      python3 -c "import json; l=json.load(open('$work/canary/training_log.json')); print('refine2', l['steps'], 'after', l['after'])"
      tar czf "$out/recipe_canary.tgz" -C "$work" canary ;;
    seer_8k)
      timeout 560 python3 -m sparse_attn eval --model canary --lengths 8192 --samples 180 --methods seer \
        --sweep seer:threshold=0.006 --profiles docs/results/profile_seer_canary_8k_cpu_2026-12-08.json \
        --out "$out/eval_seer_8k_profile" 2>&1 | grep -a "^|" ;;
    sweep)
      # Evaluation sweep of the canary in src/sparse_attn/eval/canary: dense and every method over
      # its knob range at 8K, 4K and 2K (one timeout per length, so a cut run keeps the lengths it
      # finished): accuracy, recall, density and prefill time. Comes back as eval_canary.tgz.
      sweep=$(mktemp -d)
      for spec in 8192:250 4096:150 2048:110; do
        timeout "${spec#*:}" python3 -m sparse_attn eval --model canary --lengths "${spec%:*}" --samples 4 \
          --methods xattention,flexprefill,vertical_slash,pooled_topp,oracle --out "$sweep/eval_${spec%:*}" \
          2>&1 | grep -a "^|"
      done
      tar czf "$out/eval_canary.tgz" -C "$sweep" . ;;
    prefill)
      timeout 330 python3 benchmarks/bench_prefill.py --model canary --lengths 32768 131072 65536 \
        --out "$out/prefill_canary" ;;
    attention_dense|attention_moba|attention_nsa)
      # Natively trainable attention on the canary: the base model trained from scratch for 3 minutes
      # with dense, MoBA or NSA attention (the same wall time each), then its accuracy at 2K/4K/8K
      # with its own attention (and, for MoBA, each MoBA setting of the sweep); the model comes back
      # as <step>.tgz.
      kind=${step#attention_}
      work=$(mktemp -d)
      timeout 260 python3 -m tools.canary train --no-refine --attention "$kind" --out "$work/$kind" --minutes 3 \
        --seq-len 8192 --eval-samples 4 --workers 6 --probe-every 0 > "$out/$step.log" 2>&1
      [ -f "$work/$kind/config.json" ] || { echo "$step did not finish"; tail -5 "$out/$step.log"; continue; }
      methods=none; [ "$kind" = moba ] && methods=moba
      timeout 200 python3 -m sparse_attn eval --model "$work/$kind" --lengths 2048,4096,8192 --samples 4 \
        --methods "$methods" --out "$out/eval_$step" 2>&1 | grep -a "^|"
      tar czf "$out/$step.tgz" -C "$work" "$kind" ;;
    attention_dsa)
      work=$(mktemp -d)
      timeout 330 python3 -m tools.canary dsa --out "$work/dsa" --warmup-minutes 1 --minutes 2 --top-k 1024 \
        --eval-samples 4 --workers 6 > "$out/attention_dsa.log" 2>&1
      [ -f "$work/dsa/dsa.json" ] || { echo "attention_dsa did not finish"; tail -5 "$out/attention_dsa.log"; continue; }
      python3 -c "import json; l=json.load(open('$work/dsa/training_log.json')); print('warm-up', l['warmup_steps'], l['warmup_indexer_loss'], 'sparse', l['steps'], l['sparse_indexer_loss'], 'before', l['before'], 'after', l['after'])"
      timeout 150 python3 -m sparse_attn eval --model "$work/dsa" --lengths 2048,4096,8192 --samples 4 \
        --methods none --out "$out/eval_attention_dsa" 2>&1 | grep -a "^|"
      tar czf "$out/attention_dsa.tgz" -C "$work" dsa ;;
    gpu_tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -n 8 2>&1 | tail -15 ;;
    decode)
      timeout 100 python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/decode 2>&1 | tail -5
      timeout 230 python3 benchmarks/bench_decode.py --contexts 32768 131072 --batches 1 8 32 --budgets 1024 2048 4096 \
        --page 16 --out "$out/decode_page16" 2>&1 | tee "$out/decode_page16.log" | grep -a "^|"
      for page in 32 64; do
        timeout 110 python3 benchmarks/bench_decode.py --contexts 131072 --batches 1 8 32 --budgets 2048 \
          --page $page --out "$out/decode_page$page" 2>&1 | tee "$out/decode_page$page.log" | grep -a "^|"
      done ;;
    decode_512k)
      for page in 32 64; do
        timeout 120 python3 benchmarks/bench_decode.py --contexts 524288 --batches 1 8 --budgets 2048 \
          --page $page --out "$out/decode_512k_page$page" 2>&1 | tee "$out/decode_512k_page$page.log" | grep -a "^|"
      done ;;
    prefill_8b)
      timeout 330 python3 benchmarks/bench_prefill.py --model 8b-shape --layers 2 --lengths 131072 32768 \
        --densities 0.1 --fallbacks auto auto-fresh never --out "$out/prefill_8b_shape" ;;
    decode_bounds)
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/decode/test_int8_bounds.py 2>&1 | tail -5
      for bounds in exact int8; do
        timeout 85 python3 benchmarks/bench_decode.py --contexts 131072 --batches 1 8 32 --budgets 2048 --page 64 \
          --bounds $bounds --out "$out/decode_page64_$bounds" 2>&1 | grep -a "^|"
      done
      timeout 70 python3 benchmarks/bench_decode.py --contexts 131072 --batches 1 8 --budgets 2048 --page 32 \
        --bounds int8 --out "$out/decode_page32_int8" 2>&1 | grep -a "^|" ;;
    decode_profile)
      timeout 200 python3 benchmarks/profile_decode.py --contexts 131072 --batches 1 8 --pages 16 32 64 \
        --out "$out/decode_profile" 2>&1 | tail -40 ;;
    generate_static)
      timeout 290 python3 benchmarks/bench_decode.py --generate --cache static --contexts 32768 --batches 1 8 \
        --budgets 2048 --page 64 --out "$out/decode_generate_static" 2>&1 | tee "$out/decode_generate_static.log" \
        | grep -a "^|" ;;
    trainable)
      timeout 400 python3 benchmarks/bench_trainable.py --lengths 8192 32768 65536 --kv-heads 8 2 \
        --skip "nsa per token" "nsa shared reads" --out "$out/trainable" 2>&1 | tee "$out/trainable.log" \
        | grep -a "^|\|^[0-9]*/" ;;
    nsa_reads)
      for inputs in structured random; do
        timeout 200 python3 benchmarks/bench_trainable.py --lengths 65536 32768 --kv-heads 8 --inputs $inputs \
          --skip "flex causal" "moba on flex" moba dsa --out "$out/nsa_reads_$inputs" 2>&1 | grep -a "^|"
      done ;;
    nsa_profile)
      timeout 200 python3 benchmarks/profile_nsa.py --lengths 32768 65536 --kv-heads 8 --out "$out/nsa_profile" 2>&1 \
        | grep -v "^{" | tail -70 ;;
    nsa_decode)
      timeout 150 python3 benchmarks/bench_trainable.py --lengths --decode-contexts 32768 131072 --kv-heads 8 2 \
        --out "$out/nsa_decode" 2>&1 | tee "$out/nsa_decode.log" | grep -a "^|" ;;
    train_step)
      timeout 240 python3 benchmarks/bench_trainable.py --lengths --train-contexts 8192 32768 \
        --out "$out/train_step" 2>&1 | tee "$out/train_step.log" | grep -a "^|" ;;
    warmup)
      timeout 450 python3 benchmarks/bench_warmup.py --length 32768 --out "$out/warmup" 2>&1 | grep -a "^|\|^GPU" ;;
    generate)
      timeout 200 python3 benchmarks/bench_decode.py --generate --contexts 32768 131072 --batches 1 --budgets 2048 \
        --out "$out/decode_generate" 2>&1 | tee "$out/decode_generate.log" | grep -a "^|"
      timeout 150 python3 benchmarks/bench_decode.py --generate --contexts 32768 --batches 8 --budgets 2048 \
        --out "$out/decode_generate_batch8" 2>&1 | tee "$out/decode_generate_batch8.log" | grep -a "^|" ;;
    *) echo "unknown step $step (kernels, attention, evidence, sustained, graphs, ncu, estimators, canary, refine, recipe, recipe_end, sweep, prefill, gpu_tests, decode, decode_512k, decode_bounds, decode_profile, prefill_8b, warmup, generate, generate_static, trainable, nsa_profile, nsa_reads, nsa_decode, train_step, attention_dense, attention_moba, attention_nsa, attention_dsa)" ;;
  esac
done
