"""Pack the PAD-UFES-20 subset small enough to travel with the repo to a GPU machine.

Copies ``$DVLIB_DATA/pad_ufes_20`` (``metadata.csv`` + ``images/``) to ``.devdata/pad_ufes_20`` with
every image downscaled to at most ``--max-side`` px on its shorter side (default 257, the cache side
of the ``paper`` preset's 224 px crops; bicubic, as dvlib's cache does; images already small enough
are copied byte for byte), keeps only the metadata rows that have an image, and checks the whole folder is under ``--limit-mib`` (the device tool carries at most 64 MiB
of working tree). ``.devdata/`` is git-ignored: name it in the device tool's ``carry``.

    DVLIB_DATA=../shared/datasets .venv/bin/python benchmarks/pack_data.py
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib.data import load_dataset  # noqa: E402
from dvlib.io import DvlibError  # noqa: E402
from dvlib.loader import cache_size_for  # noqa: E402

DEFAULT_SIDE = cache_size_for(224)


def _pack_one(src: Path, dst_dir: Path, max_side: int, quality: int) -> tuple[Path, bool]:
    with Image.open(src) as im:
        w, h = im.size
        if min(w, h) <= max_side:
            dst = dst_dir / src.name
            shutil.copyfile(src, dst)
            return dst, False
        im = im.convert("RGB")
        s = max_side / min(w, h)
        size = (max(max_side, round(w * s)), max(max_side, round(h * s)))
        im = im.resize(size, Image.BICUBIC, reducing_gap=2.0)
        dst = dst_dir / (src.stem + ".jpg")
        im.save(dst, format="JPEG", quality=quality, subsampling=0)
        return dst, True


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack(src_root: Path, dest: Path, max_side: int = DEFAULT_SIDE, quality: int = 92, limit_mib: float = 60.0,
         workers: int | None = None) -> dict:
    index = load_dataset("pad_ufes_20", root=src_root)
    src = src_root / "pad_ufes_20"
    out = dest / "pad_ufes_20"
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    meta = pd.read_csv(src / "metadata.csv", dtype=str)
    stems = set(index.records["image"])
    meta = meta[meta["img_id"].map(lambda s: Path(s).stem).isin(stems)]
    meta.to_csv(out / "metadata.csv", index=False)
    for extra in ("SUBSET.csv", "README.md", "LICENSE"):
        if (src / extra).exists():
            shutil.copyfile(src / extra, out / extra)
    paths = [Path(p) for p in index.records["path"]]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
        done = list(pool.map(lambda p: _pack_one(p, out / "images", max_side, quality), paths))
    total = folder_bytes(out)
    info = {"source": str(src), "dest": str(out), "images": len(done), "resized": sum(r for _, r in done),
            "metadata_rows": len(meta), "max_side": max_side, "jpeg_quality": quality,
            "total_mib": round(total / 2 ** 20, 2), "limit_mib": limit_mib}
    check = load_dataset("pad_ufes_20", root=dest)
    if len(check) != len(index):
        raise DvlibError(f"{out}: indexes {len(check)} images, the source {len(index)}")
    if total > limit_mib * 2 ** 20:
        raise DvlibError(f"{out}: {info['total_mib']} MiB is over {limit_mib} MiB; "
                         "lower --max-side or --quality")
    return info


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=os.environ.get("DVLIB_DATA") or str(ROOT.parent / "shared" / "datasets"),
                    help="data root holding pad_ufes_20/ (default $DVLIB_DATA, else ../shared/datasets)")
    ap.add_argument("--dest", default=str(ROOT / ".devdata"), help="destination data root (default .devdata)")
    ap.add_argument("--max-side", type=int, default=DEFAULT_SIDE,
                    help=f"shorter side at most this many px (default {DEFAULT_SIDE}: the cache side of 224 px "
                         "crops, so dvlib's own resize becomes a no-op there)")
    ap.add_argument("--quality", type=int, default=92, help="JPEG quality of resized images (default 92)")
    ap.add_argument("--limit-mib", type=float, default=60.0, help="fail above this total size (default 60)")
    a = ap.parse_args(argv)
    info = pack(Path(a.src), Path(a.dest), a.max_side, a.quality, a.limit_mib)
    print(f"packed {info['images']} images ({info['resized']} resized to <= {info['max_side']} px) "
          f"into {info['dest']}: {info['total_mib']} MiB (limit {info['limit_mib']} MiB)")
    return info


if __name__ == "__main__":
    main()
