#!/usr/bin/env bash
# Run a list of methods over the 10 cross-domain datasets and write the results table.
#
#   scripts/run_cross_domain.sh DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]
#   e.g. scripts/run_cross_domain.sh ~/data zeroshot,tda,dmn,boostadapter results/cross_domain --model ViT-B-16 --pretrained openai
#
# Re-running the same command skips finished results and resumes unfinished ones. Layouts: datasets/DATASETS.md.
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]}
methods=${2:-zeroshot,ensemble}
results=${3:-results/cross_domain}
shift $(( $# < 3 ? $# : 3 ))

vlmtta data check --root "$root" --datasets cross_domain --no-decode --allow-partial \
    || echo "$0: some datasets are missing or incomplete (see above); running the others" >&2
status=0
vlmtta bench --root "$root" --datasets cross_domain --methods "$methods" --results "$results" "$@" || status=$?
vlmtta table "$results" --format md --output "$results/table.md"
exit "$status"
