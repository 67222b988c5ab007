#!/usr/bin/env bash
# Run a list of methods over ImageNet-C (the 15 corruptions at severity 5, one result each) and write the table.
#
#   scripts/run_imagenet_c.sh DATA_ROOT [METHODS] [RESULTS_DIR] [more 'vlmtta bench' arguments]
#   e.g. scripts/run_imagenet_c.sh ~/data zeroshot,tda,dmn results/imagenet_c
#        scripts/run_imagenet_c.sh ~/data tda,dmn results/imagenet_c --continual --reset-between never
exec "$(dirname "$0")/run_group.sh" imagenet_c "$@"
