"""A hospital's own images: what every stage trains, restores and evaluates on.

:class:`LocalData` is one hospital's images with its train/test split, however it was obtained: a
simulated hospital of a run (rows of the run's manifest, :func:`from_manifest`) or a real site's
folder (:func:`open_local`: a folder of class sub-folders or a registered dataset, split by patient
with one seed, or by a saved manifest). Both drivers then call the same stages on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from dvlib.data.base import DatasetIndex
from dvlib.io import DvlibError

SUBSETS = ("all", "train", "test")


@dataclass
class LocalData:
    label: str                 # the site's name in records (never an image or patient id)
    index: DatasetIndex
    manifest: pd.DataFrame     # this hospital's rows: image, patient, label, hospital, subset
    classes: list[str]         # the agreed class list, in label order
    split: dict                # how the split was made, for the metadata (no image ids)
    cache: object = field(default=None, repr=False)  # a shared dvlib.loader.ImageCache, or built on use

    def images(self, subset: str) -> list[str]:
        """Image ids of ``subset`` (``all``, ``train`` or ``test``), sorted: a fixed batch order."""
        if subset not in SUBSETS:
            raise DvlibError(f"unknown subset {subset!r}; valid: {', '.join(SUBSETS)}")
        m = self.manifest if subset == "all" else self.manifest[self.manifest["subset"] == subset]
        return sorted(m["image"])

    def class_counts(self, subset: str) -> dict[str, int]:
        m = self.manifest if subset == "all" else self.manifest[self.manifest["subset"] == subset]
        return {c: int((m["label"] == c).sum()) for c in self.classes}

    def shard(self, subset: str, size: int, device="cpu"):
        """A :class:`dvlib.loader.Shard` of ``subset``; decodes the images once if no cache is shared."""
        from dvlib.loader import ImageCache, Shard, cache_size_for

        images = self.images(subset)
        if not images:
            raise DvlibError(f"{self.label}: the {subset!r} images are empty ({len(self.manifest)} images; "
                             f"split {self.split})")
        if self.cache is None or self.cache.side != cache_size_for(size):
            self.cache = ImageCache.build(self.index, self.images("all"), cache_size_for(size), device=device)
        cid = {c: i for i, c in enumerate(self.classes)}
        labels = self.manifest.set_index("image").loc[images, "label"].map(cid)
        return Shard(self.label, self.cache, self.cache.rows(images), torch.tensor(labels.to_numpy(), dtype=torch.long))


def _agreed_classes(index: DatasetIndex, classes: Sequence[str] | None, source: str) -> list[str]:
    if classes is None:
        return list(index.classes)
    from dvlib.checks import label_problem

    classes = [str(c) for c in classes]
    bad = [why for c in classes if (why := label_problem(c, f"{source} class name"))]
    if bad:
        raise DvlibError(bad[0])
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup or len(classes) < 2:
        raise DvlibError(f"{source}: needs at least 2 distinct classes, got {classes}")
    extra = [c for c in sorted(set(index.records["label"])) if c not in classes]
    if extra:
        raise DvlibError(f"{index.root or index.name}: local classes {extra} are not among {source} {classes}")
    return classes


def from_manifest(index: DatasetIndex, manifest: pd.DataFrame, hospital: int | None, *,
                  classes: Sequence[str] | None = None, label: str | None = None, cache=None,
                  source: str = "manifest") -> LocalData:
    """Hospital ``hospital`` of a manifest (``None``: every hospital together, for Full Training)."""
    part = manifest if hospital is None else manifest[manifest["hospital"] == int(hospital)]
    if part.empty:
        raise DvlibError(f"{source}: no images of hospital {hospital} (hospitals: "
                         f"{sorted(manifest['hospital'].unique().tolist())})")
    unknown = sorted(set(part["image"]) - set(index.records["image"]))
    if unknown:
        raise DvlibError(f"{source}: {len(unknown)} images are not in dataset {index.name!r}, e.g. {unknown[0]!r}")
    label = label or ("all_hospitals" if hospital is None else f"hospital_{int(hospital)}")
    return LocalData(label, index, part.reset_index(drop=True), _agreed_classes(index, classes, "--classes"),
                     {"manifest": Path(source).name, "hospital": hospital}, cache)


def site_label(data: str, index: DatasetIndex, site: str | None) -> str:
    from dvlib.checks import label_problem

    label = site if site else (Path(data).absolute().name if Path(data).is_dir() else index.name)
    if label_problem(label, "site label") or "/" in label or "\\" in label or label.startswith("."):
        raise DvlibError(f"invalid site label {label!r}: give --site NAME (letters, digits, '-', '_')")
    return label


def open_local(data: str, *, split_seed: int = 0, test_frac: float = 0.2, classes: Sequence[str] | None = None,
               manifest: str | None = None, hospital: int | None = None, site: str | None = None,
               source: str = "--classes") -> LocalData:
    """A site's data: a folder (one sub-folder per class, optional patients.csv) or a dataset name,
    split by patient into train/test with ``split_seed`` and ``test_frac``, or by a saved ``manifest``
    (a CSV with columns image, patient, label, hospital, subset; ``hospital`` picks its rows).
    ``classes``: the class list the sites agreed on (a class without local images is allowed)."""
    from dvlib.data import load_dataset
    from dvlib.split import load_manifest, make_split

    data = str(data)
    if Path(data).exists() and not Path(data).is_dir():
        raise DvlibError(f"{data}: is a file; give the site's folder (one sub-folder per class holding images)")
    if Path(data).is_dir() and not any(Path(data).iterdir()):
        raise DvlibError(f"{data}: the site folder is empty (expected one sub-folder per class holding images)")
    index = load_dataset(data)
    if len(index) == 0:
        raise DvlibError(f"{data}: no images found")
    agreed = _agreed_classes(index, classes, source)
    if manifest is not None:
        m = load_manifest(manifest, agreed)
        if hospital is None and m["hospital"].nunique() > 1:
            raise DvlibError(f"{manifest}: holds {m['hospital'].nunique()} hospitals; give --hospital")
        local = from_manifest(index, m, hospital if hospital is not None else int(m["hospital"].iloc[0]),
                              classes=agreed, label=site, source=str(manifest))
        return replace(local, label=site_label(data, index, site) if site else local.label)
    index = replace(index, classes=agreed)
    try:
        m = make_split(index, n_hospitals=1, test_frac=test_frac, seed=split_seed, allow_missing_classes=classes is not None)
    except DvlibError as e:
        raise DvlibError(f"{data}: cannot split the local data: {e}") from None
    return LocalData(site_label(data, index, site), index, m, agreed,
                     {"seed": int(split_seed), "test_frac": float(test_frac)})
