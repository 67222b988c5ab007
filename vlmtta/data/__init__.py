"""Dataset readers of the evaluation harness: the 10 cross-domain sets and the ImageNet variants."""
from .catalog import CROSS_DOMAIN, DATASETS, IMAGENET_VARIANTS, OOD, DatasetSpec, get_spec, parse_datasets
from .check import CheckReport, check_dataset
from .readers import DatasetNotFound, Split, read_split

__all__ = ["CROSS_DOMAIN", "DATASETS", "IMAGENET_VARIANTS", "OOD", "CheckReport", "DatasetNotFound", "DatasetSpec",
           "Split", "check_dataset", "get_spec", "parse_datasets", "read_split"]
