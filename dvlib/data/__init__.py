"""Datasets: a registry of image tables with labels and patients (see :mod:`dvlib.data.base`)."""
from dvlib.data.base import DATASETS, DatasetIndex, data_root, dataset_dir, load_dataset, read_rgb, register
from dvlib.data import bladder, imagefolder, pad_ufes, retina, synthetic  # noqa: F401  (register the datasets)

__all__ = ["DATASETS", "DatasetIndex", "data_root", "dataset_dir", "load_dataset", "read_rgb", "register"]
