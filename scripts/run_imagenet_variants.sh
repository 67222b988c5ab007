#!/usr/bin/env bash
# Run a list of methods over ImageNet and its 4 variants (A, V2, R, Sketch) and write the results table.
#
#   scripts/run_imagenet_variants.sh DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]
#   e.g. scripts/run_imagenet_variants.sh ~/data zeroshot,tda,dmn,boostadapter results/imagenet_variants --model ViT-B-16 --pretrained openai
exec "$(dirname "$0")/run_group.sh" imagenet_variants "$@"
