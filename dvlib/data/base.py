"""The dataset registry: every dataset is a table of images with a label and a patient.

A :class:`DatasetIndex` lists what exists on disk (one row per image: ``image``, ``patient``,
``label``, ``path``) plus the ordered class list. Images are decoded on demand by ``load_image``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from dvlib.io import DvlibError

COLUMNS = ("image", "patient", "label", "path")


@dataclass
class DatasetIndex:
    name: str
    classes: list[str]
    records: pd.DataFrame
    root: Path | None = None
    info: dict = field(default_factory=dict)
    loader: Callable[[pd.Series], np.ndarray] | None = None

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.records.columns]
        if missing:
            raise DvlibError(f"dataset {self.name!r}: records lack columns {missing}")
        self.records = self.records.reset_index(drop=True)
        dup = self.records["image"][self.records["image"].duplicated()]
        if len(dup):
            raise DvlibError(f"dataset {self.name!r}: duplicate image ids, e.g. {dup.iloc[0]!r}")
        unknown = sorted(set(self.records["label"]) - set(self.classes))
        if unknown:
            raise DvlibError(f"dataset {self.name!r}: labels {unknown} not in classes {self.classes}")
        self._by_image = None

    def __len__(self) -> int:
        return len(self.records)

    def row(self, image: str) -> pd.Series:
        if self._by_image is None:
            self._by_image = self.records.set_index("image")
        try:
            r = self._by_image.loc[image]
        except KeyError:
            raise DvlibError(f"dataset {self.name!r} has no image {image!r}") from None
        return pd.concat([pd.Series({"image": image}), r])

    def load_image(self, image: str) -> np.ndarray:
        """Decode one image as an RGB uint8 array (H, W, 3)."""
        row = self.row(image)
        if self.loader is not None:
            return self.loader(row)
        return read_rgb(row["path"])

    def counts(self) -> pd.DataFrame:
        """Images and patients per class."""
        g = self.records.groupby("label")
        out = pd.DataFrame({"images": g.size(), "patients": g["patient"].nunique()})
        return out.reindex(self.classes, fill_value=0)

    def summary(self) -> dict:
        return {"dataset": self.name, "images": len(self), "patients": int(self.records["patient"].nunique()),
                "classes": list(self.classes), **{k: v for k, v in self.info.items() if not isinstance(v, list)}}


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DvlibError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DvlibError(f"corrupt or unreadable image file: {path} ({e})") from e


# --- registry -------------------------------------------------------------------------------

@dataclass
class DatasetSpec:
    name: str
    build: Callable[..., DatasetIndex]
    description: str
    needs_root: bool = True


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, description: str, needs_root: bool = True):
    def deco(fn):
        DATASETS[name] = DatasetSpec(name, fn, description, needs_root)
        return fn
    return deco


def data_root() -> Path:
    """Data root: ``$DVLIB_DATA`` if set, else ``data/raw``."""
    return Path(os.environ.get("DVLIB_DATA") or "data/raw")


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    base = Path(root) if root is not None else data_root()
    return base / name


def load_dataset(name: str, root: str | os.PathLike | None = None, **opts) -> DatasetIndex:
    """Index a dataset by name, or a folder of class sub-folders given as a path.

    ``root`` is the data root holding ``<name>/`` (default ``$DVLIB_DATA`` or ``data/raw``).
    """
    if name not in DATASETS:
        if Path(name).is_dir():
            return DATASETS["imagefolder"].build(Path(name), **opts)
        raise DvlibError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))} "
                         "or a path to a folder with one sub-folder per class")
    spec = DATASETS[name]
    if not spec.needs_root:
        return spec.build(**opts)
    folder = dataset_dir(name, root)
    if not folder.is_dir():
        env = os.environ.get("DVLIB_DATA")
        if root is not None:
            where = f"data root given as {root}"
        else:
            where = f"DVLIB_DATA={env}" if env else "DVLIB_DATA is not set, so the default data/raw was used"
        raise DvlibError(f"dataset {name!r} not found: looked for the folder {folder.resolve()} ({where}). "
                         f"Point DVLIB_DATA at the folder that holds {name}/, "
                         f"or run `dvlib data download {name}`.")
    return spec.build(folder, **opts)
