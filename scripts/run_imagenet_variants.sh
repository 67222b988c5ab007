#!/usr/bin/env bash
# Run a list of methods over ImageNet and its 4 variants (A, V2, R, Sketch) and write the results table.
#
#   scripts/run_imagenet_variants.sh DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]
#   e.g. scripts/run_imagenet_variants.sh ~/data zeroshot,tda,dmn,boostadapter results/imagenet_variants --model ViT-B-16 --pretrained openai
#
# Re-running the same command skips finished results and resumes unfinished ones. Layouts: datasets/DATASETS.md.
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]}
methods=${2:-zeroshot,ensemble}
results=${3:-results/imagenet_variants}
shift $(( $# < 3 ? $# : 3 ))

vlmtta data check --root "$root" --datasets imagenet_variants --no-decode --allow-partial \
    || echo "$0: some datasets are missing or incomplete (see above); running the others" >&2
status=0
vlmtta bench --root "$root" --datasets imagenet_variants --methods "$methods" --results "$results" "$@" || status=$?
vlmtta table "$results" --format md --output "$results/table.md"
exit "$status"
