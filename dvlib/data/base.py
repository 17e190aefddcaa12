"""The dataset registry: every dataset is a table of images with a label and a patient.

A :class:`DatasetIndex` lists what exists on disk (one row per image: ``image``, ``patient``,
``label``, ``path``) plus the ordered class list. Images are decoded on demand by ``load_image``
(:func:`dvlib.data.decode.read_rgb`). Files and folders a file manager, NAS or archiver made
(:func:`is_hidden`) are not images of a class: loaders skip them by listing :func:`visible_files`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dvlib.data.decode import read_rgb
from dvlib.io import DvlibError
from dvlib.runs import project_root

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


HIDDEN_NAMES = ("__macosx", "thumbs.db")  # compared case-folded: Windows writes Thumbs.db or thumbs.db


def is_hidden(name: str) -> bool:
    """A file or folder name that a file manager, a NAS or an archiver made, not a user's image:
    starting with "." (.thumbnails, .DS_Store, ._x.png) or "@" (Synology's @eaDir), __MACOSX, Thumbs.db."""
    return name.startswith((".", "@")) or name.casefold() in HIDDEN_NAMES


def count_files(path: Path) -> int:
    """Files under the folder ``path`` (1 if it is not a folder)."""
    return sum(len(f) for _, _, f in os.walk(path)) if path.is_dir() else 1


def visible_files(folder: Path) -> tuple[list[Path], int]:
    """The files under ``folder`` with no hidden part in their path below it, sorted, and how many
    files were skipped as hidden (those in hidden folders included). Like ``Path.rglob``, it does
    not enter symbolic links to folders below ``folder``."""
    shown, hidden = [], 0
    for top, dirs, files in os.walk(folder):
        for d in [d for d in dirs if is_hidden(d)]:
            hidden += count_files(Path(top) / d)
            dirs.remove(d)
        for f in files:
            if is_hidden(f):
                hidden += 1
            else:
                shown.append(Path(top) / f)
    return sorted(shown), hidden


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
    """Data root: ``$DVLIB_DATA`` if set, else ``data/raw``; a relative one is taken from the project
    root, not the working folder (JupyterLab starts kernels in notebooks/)."""
    root = Path(os.environ.get("DVLIB_DATA") or "data/raw")
    if root.is_absolute():
        return root
    return project_root() / root


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
