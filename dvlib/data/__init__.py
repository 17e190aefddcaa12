"""Datasets: a registry of image tables with labels and patients (see :mod:`dvlib.data.base`).

Importing a dataset module registers its loader; its download :class:`~dvlib.data.sources.Source`
is registered here, in the paper's order (Retina, Bladder, PAD-UFES-20), then the ODIR-2019 fundus
subset that stands in for Retina.
"""
from dvlib.data.base import DATASETS, DatasetIndex, data_root, dataset_dir, load_dataset, read_rgb, register
from dvlib.data import bladder, imagefolder, odir_fundus, pad_ufes, retina, synthetic  # noqa: F401  (register the datasets)
from dvlib.data.sources import register_source

for _dataset in (retina, bladder, pad_ufes, odir_fundus):
    register_source(_dataset.SOURCE)
del _dataset

__all__ = ["DATASETS", "DatasetIndex", "data_root", "dataset_dir", "load_dataset", "read_rgb", "register"]
