#!/usr/bin/env bash
# Accelerator check (GPU or TPU): the search-step benchmark and the input pipeline, in at
# most 4 minutes on one device, no network.
#
#   bash benchmarks/gpu_check.sh            # JSON (and logs) go to $OUT/ when OUT is set
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # tiny settings: a smoke run on a CPU
#
# Needs a Python with jax[cuda] (or jax[tpu]) and flax/optax, and TensorFlow +
# tensorflow-datasets for the pipeline figure (nothing is installed; the repository is
# imported through PYTHONPATH). Runs, each under `timeout` within one overall budget:
#   1. nvidia-smi summary (if any) and jax devices;
#   2. resnet50, batch 256, bfloat16 and float32: search vs dense images/s, mask update
#      ms and share of the step, compile seconds, recompilation check;
#   3. resnet32 and vgg19_cifar, batch 256, float32;
#   4. the ImageNet input pipeline: images/s per CPU core and cores per device.
# (The k-th value prototypes that led to the library's all-layer mask update, and this
# check's step that timed them, are in the history at commit 7b84278:
# benchmarks/kth_value_prototypes.py.)
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default 235),
# GPU_CHECK_QUICK=1 (tiny settings, to try the script itself on a CPU machine).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-235}"
QUICK="${GPU_CHECK_QUICK:-0}"
OUTDIR="${OUT:-}"
LOGDIR="$(mktemp -d)"
if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR" || OUTDIR=""
fi
START=$SECONDS
FAILURES=0

section() { echo; echo "=== $* [t=$((SECONDS - START))s]"; }

# Seconds a step may use: its cap, or what is left of the budget.
limit_for() {
    local cap=$1 left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt "$cap" ]; then echo "$left"; else echo "$cap"; fi
}

save() {  # copy a file to $OUT if set
    if [ -n "$OUTDIR" ] && [ -s "$1" ]; then cp "$1" "$OUTDIR/"; fi
}

summarize() {  # the numbers that matter, from one search_step JSON
    "$PY" - "$1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for name, m in d['models'].items():
    s, dn, mu = m['search'], m['dense'], m['mask_update']
    print(f"{name} bs={m['batch_size']} {m['dtype']} on {d['environment']['device_kind']}:")
    print(f"  search {s['ms_median']:.2f} ms ({s['images_per_s']:.0f} img/s), "
          f"dense {dn['ms_median']:.2f} ms ({dn['images_per_s']:.0f} img/s), "
          f"search/dense {m['search_over_dense']:.3f}")
    line = f"  mask update {mu['ms_median']:.3f} ms = {100 * mu['fraction_of_search_step']:.2f}% of the step"
    if 'mask_update_in_step_ms' in m:
        line += (f"; in-step {m['mask_update_in_step_ms']:.3f} ms = "
                 f"{100 * m['mask_update_in_step_fraction']:.2f}%")
    print(line)
    if 'mask_update_rate' in m:
        print(f"  mask update (rate<1) {m['mask_update_rate']['ms_median']:.3f} ms")
    print(f"  compile s: search {s['compile_s']}, dense {dn['compile_s']}")
    print(f"  recompilation: {m['recompilation']}")
    print(f"  targets: {m['targets']}")
EOF
}

bench() {  # bench NAME CAP_SECONDS ARGS...
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(limit_for "$cap")
    section "$name (limit ${limit}s)"
    if [ "$limit" -lt 20 ]; then
        echo "SKIPPED: out of time budget"
        FAILURES=$((FAILURES + 1))
        return
    fi
    local json="$LOGDIR/$name.json" err="$LOGDIR/$name.log"
    timeout -k 10 "$limit" "$PY" -m benchmarks.search_step "$@" --output="$json" \
        >/dev/null 2>"$err"
    local rc=$?
    grep -v '^\s*$' "$err" | tail -n 15
    save "$err"
    if [ "$rc" -ne 0 ] || [ ! -s "$json" ]; then
        echo "FAILED: rc=$rc (124/137: timed out)"
        FAILURES=$((FAILURES + 1))
        return
    fi
    save "$json"
    summarize "$json" || FAILURES=$((FAILURES + 1))
}

section "nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,driver_version \
        --format=csv || echo "nvidia-smi query failed"
else
    echo "nvidia-smi not found"
fi

section "jax"
timeout 90 "$PY" -c '
import jax
print("jax", jax.__version__, "| backend", jax.default_backend())
for d in jax.devices():
    print(" ", d, "|", d.device_kind)
' || { echo "FAILED: jax did not start"; FAILURES=$((FAILURES + 1)); }

pipeline() {  # pipeline CAP_SECONDS ARGS...: the input-pipeline benchmark's table
    local cap=$1
    shift
    local limit
    limit=$(limit_for "$cap")
    section "input pipeline (limit ${limit}s)"
    if [ "$limit" -lt 15 ]; then
        echo "SKIPPED: out of time budget"
        FAILURES=$((FAILURES + 1))
        return
    fi
    local json="$LOGDIR/input_pipeline.json" err="$LOGDIR/input_pipeline.log"
    timeout -k 10 "$limit" "$PY" -m benchmarks.input_pipeline "$@" --output="$json" \
        >/dev/null 2>"$err"
    local rc=$?
    save "$err"
    if [ "$rc" -ne 0 ] || [ ! -s "$json" ]; then
        grep -v '^\s*$' "$err" | tail -n 8
        echo "FAILED: rc=$rc (124/137: timed out)"
        FAILURES=$((FAILURES + 1))
        return
    fi
    save "$json"
    grep -E '^(\||imagenet:)' "$err"
}

if [ "$QUICK" = "1" ]; then
    SMALL=(--models=small_cnn --batch_size=8 --steps=2 --warmup=0 --no-rate_update)
    bench quick_bfloat16 120 "${SMALL[@]}" --dtype=bfloat16
    bench quick_float32 120 "${SMALL[@]}" --dtype=float32 --no-ablation --no-per_layer
    pipeline 120 --quick --seconds=0.5 --pipelines=imagenet_train,cifar10_train
else
    R50=(--models=resnet50 --batch_size=256 --steps=8 --warmup=2 --no-rate_update)
    bench resnet50_b256_bfloat16 70 "${R50[@]}" --dtype=bfloat16
    # The per-layer update (the all-layer one's reference) only in the first run: compiles cost.
    bench resnet50_b256_float32 60 "${R50[@]}" --dtype=float32 --no-ablation --no-per_layer
    bench cifar_b256_float32 45 --models=resnet32,vgg19_cifar --batch_size=256 --dtype=float32 \
        --steps=10 --inner=3 --warmup=2 --no-rate_update --no-ablation --no-per_layer
    pipeline 45 --threads=1 --seconds=4 --train_images=256 --eval_images=96 \
        --pipelines=imagenet_train,imagenet_eval
fi

section "done: $FAILURES failure(s); logs in $LOGDIR${OUTDIR:+, copied to $OUTDIR}"
[ "$FAILURES" -eq 0 ]
