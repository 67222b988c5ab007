#!/usr/bin/env bash
# Run a list of methods over the 10 cross-domain datasets and write the results table.
#
#   scripts/run_cross_domain.sh DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]
#   e.g. scripts/run_cross_domain.sh ~/data zeroshot,tda,dmn,boostadapter results/cross_domain --model ViT-B-16 --pretrained openai
exec "$(dirname "$0")/run_group.sh" cross_domain "$@"
