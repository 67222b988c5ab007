#!/usr/bin/env bash
# Run a list of methods over a dataset group and write the results table.
#
#   scripts/run_group.sh GROUP DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]
#   GROUP: cross_domain (the 10 datasets), imagenet_variants (ImageNet, -A, -V2, -R, -Sketch), or a corruption
#          benchmark (imagenet_c, cifar10_c, cifar100_c: its 15 corruptions at severity 5)
#
# Re-running the same command skips finished results and resumes unfinished ones. Layouts: datasets/DATASETS.md.
set -euo pipefail
usage="usage: $0 GROUP DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]"
group=${1:?$usage}
root=${2:?$usage}
methods=${3:-zeroshot,ensemble}
results=${4:-results/$group}
shift $(( $# < 4 ? $# : 4 ))

vlmtta data check --root "$root" --datasets "$group" --no-decode --allow-partial \
    || echo "$0: some datasets are missing or incomplete (see above); running the others" >&2
status=0
vlmtta bench --root "$root" --datasets "$group" --methods "$methods" --results "$results" "$@" || status=$?
vlmtta table "$results" --format md --output "$results/table.md"
exit "$status"
