#!/usr/bin/env bash
# Every GPU benchmark of the closing notes in one go (ViT-B-16, random weights):
#   scripts/bench_gpu.sh OUTDIR [python]
# 1. GPU-path tests; 2. latent methods + TPT/C-TPT next to encoding 64 views (1000 classes);
# 3. TPT/C-TPT vs the full-context reference at 1000/200/37 classes, DiffTPT without and with
#    generation (random-weight Stable Diffusion Image Variations); 4. TCA GFLOPs and latency; 5. SubTTA.
# A failing step is reported and the next one still runs; the exit status counts the failures.
set -uo pipefail
out=${1:?usage: scripts/bench_gpu.sh OUTDIR [python]}
py=${2:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failures=0
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || { echo "== $name FAILED"; failures=$((failures + 1)); }
}
step tests "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_views.py
step speed "$py" -m vlmtta bench-speed --device cuda --n-views 64 --n-classes 1000 --repeats 20 --warmup 3 \
    --methods zeroshot,sts,sts_ensemble,zero,mta,te,adte,tpt,ctpt --output "$out/speed_cuda.json"
step tca "$py" scripts/bench_tca.py --device cuda --repeats 20 --output "$out/tca_cuda.json"
step batch "$py" scripts/bench_batch.py --device cuda --batch 64 --n-views 64 --output "$out/batch_cuda.json"
step tpt "$py" scripts/bench_tpt.py --device cuda --methods tpt,ctpt --classes 1000,200,37 --n-views 64 \
    --repeats 5 --difftpt --generation --output "$out/tpt_cuda.json"
exit "$failures"
