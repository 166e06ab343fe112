"""Datasets: importing this package registers every adapter in DATASETS."""
from lpt_core.data.base import DATASETS, DatasetBundle, Normalization, build_dataset, register_dataset
from lpt_core.data import cifar_lt, inat, list_file, sketch, synthetic  # noqa: F401  (registers every adapter)

__all__ = ["DATASETS", "DatasetBundle", "Normalization", "build_dataset", "register_dataset"]
