"""Dataset readers of the evaluation harness: the 10 cross-domain sets, the ImageNet variants, ImageNet-C and
CIFAR-10-C / -100-C."""
from .catalog import (CORRUPTION_BENCHMARKS, CORRUPTIONS, CROSS_DOMAIN, DATASETS, IMAGENET_VARIANTS, OOD, DatasetSpec,
                      get_spec, parse_datasets, parse_severities)
from .check import CheckReport, check_dataset
from .readers import DatasetNotFound, Split, read_split

__all__ = ["CORRUPTIONS", "CORRUPTION_BENCHMARKS", "CROSS_DOMAIN", "DATASETS", "IMAGENET_VARIANTS", "OOD",
           "CheckReport", "DatasetNotFound", "DatasetSpec", "Split", "check_dataset", "get_spec", "parse_datasets",
           "parse_severities", "read_split"]
