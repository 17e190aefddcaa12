"""Loaders for the paper's datasets and their verified downloads, end to end over local HTTP.

Every archive is built here in its dataset's published layout (a few tiny PNGs) and served from
``http.server`` on 127.0.0.1 (random free port); nothing touches the network.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dvlib.data import DatasetIndex, load_dataset
from dvlib.data import download as dl
from dvlib.data.paper import PAPER_RESULTS, paper_results, paper_table
from dvlib.io import DvlibError

SHARED = Path("/work/shared/datasets")


# --- archive builders -------------------------------------------------------------------------

def png(seed: int, size: int = 8) -> bytes:
    im = Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


RETINA_COUNTS = {"1_normal": 4, "2_cataract": 2, "2_glaucoma": 2, "3_retina_disease": 2}


def retina_archive(skip: tuple[str, ...] = ()) -> bytes:
    """GitHub's archive of yiweichen04/retina_dataset: retina_dataset-master/dataset/<class>/."""
    entries = {"retina_dataset-master/README.md": b"# retina dataset\n"}
    seed = 0
    for folder, n in RETINA_COUNTS.items():
        if folder in skip:
            continue
        for k in range(n):
            seed += 1
            entries[f"retina_dataset-master/dataset/{folder}/{folder[2:4].upper()}_{k:03d}.png"] = png(seed)
    return make_zip(entries)


BLADDER_ROWS = [  # image, tissue, imaging, case, split
    ("case1_001.png", "HGC", "WLI", "1", "train"), ("case1_002.png", "HGC", "NBI", "1", "train"),
    ("case1_003.png", "NST", "WLI", "1", "train"), ("case2_001.png", "LGC", "WLI", "2", "train"),
    ("case2_002.png", "LGC", "NBI", "2", "train"), ("case2_003.png", "NTL", "WLI", "2", "train"),
    ("case3_001.png", "HGC", "WLI", "3", "val"), ("case3_002.png", "NST", "NBI", "3", "val"),
    ("case4_001.png", "LGC", "WLI", "4", "test"), ("case4_002.png", "NTL", "WLI", "4", "test"),
    ("case4_003.png", "NST", "WLI", "4", "test"),
]
BLADDER_HEADER = ("image name", "tissue type", "imaging type", "case number", "sub_dataset")


def bladder_csv(header=BLADDER_HEADER, rows=BLADDER_ROWS, drop: str | None = None) -> bytes:
    table = pd.DataFrame(rows, columns=list(header))
    if drop:
        table = table.drop(columns=[drop])
    return table.to_csv(index=False).encode()


def bladder_archive(drop: str | None = None) -> bytes:
    """Zenodo 7741476: baldder_tissue_classification/{HGC,LGC,NST,NTL}/*.png + annotations.csv."""
    top = "baldder_tissue_classification"
    entries = {f"{top}/annotations.csv": bladder_csv(drop=drop)}
    for k, (name, tissue, *_rest) in enumerate(BLADDER_ROWS):
        entries[f"{top}/{tissue}/{name}"] = png(100 + k)
    return make_zip(entries)


PAD_ROWS = [  # patient_id, lesion_id, img_id, diagnostic
    ("PAT_1", "1", "PAT_1_1_11.png", "BCC"), ("PAT_1", "2", "PAT_1_2_12.png", "ACK"),
    ("PAT_2", "3", "PAT_2_3_13.png", "NEV"), ("PAT_3", "4", "PAT_3_4_14.png", "MEL"),
    ("PAT_4", "5", "PAT_4_5_15.png", "SCC"), ("PAT_5", "6", "PAT_5_6_16.png", "SEK"),
    ("PAT_5", "6", "PAT_5_6_17.png", "SEK"), ("PAT_6", "7", "PAT_6_7_18.png", "BCC"),
    ("PAT_7", "8", "PAT_7_8_19.png", "BCC"), ("PAT_8", "9", "PAT_8_9_20.png", "BCC"),
]


def pad_archive() -> bytes:
    """Mendeley zr7vgbcyr2-1.zip: metadata.csv + images/imgs_part_{1,2}.zip (nested zips)."""
    meta = pd.DataFrame(PAD_ROWS, columns=["patient_id", "lesion_id", "img_id", "diagnostic"])
    meta.insert(2, "age", "50")
    meta["biopsed"] = "True"
    parts: dict[str, dict[str, bytes]] = {"imgs_part_1": {}, "imgs_part_2": {}}
    for k, (_p, _l, img, _d) in enumerate(PAD_ROWS):
        part = "imgs_part_1" if k < 5 else "imgs_part_2"
        parts[part][f"{part}/{img}"] = png(200 + k)
    entries = {"metadata.csv": meta.to_csv(index=False).encode()}
    for part, files in parts.items():
        entries[f"images/{part}.zip"] = make_zip(files)
    return make_zip(entries)


# --- a local HTTP server with Range support ---------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        data = srv.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404, "not found")
            return
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.support_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drop_after is not None:
            body = body[:srv.drop_after]
        self.wfile.write(body)
        srv.sent += len(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@contextlib.contextmanager
def serve(files: dict[str, bytes], support_range: bool = True, drop_after: int | None = None):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.support_range, srv.drop_after = files, support_range, drop_after
    srv.requests, srv.sent = [], 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def maybe_split(index: DatasetIndex, n_hospitals: int = 2) -> None:
    """Split with dvlib.split.make_split when it exists; patients must not straddle hospitals or subsets."""
    if importlib.util.find_spec("dvlib.split") is None:
        return
    split = importlib.import_module("dvlib.split")
    if not hasattr(split, "make_split"):
        return
    manifest = split.make_split(index, n_hospitals=n_hospitals, test_frac=0.5, seed=0,
                                allow_missing_classes=True)
    assert len(manifest) == len(index) and set(manifest["image"]) == set(index.records["image"])
    assert (manifest.groupby("patient")[["hospital", "subset"]].nunique() == 1).all().all()
    assert manifest["hospital"].nunique() == n_hospitals


# --- end to end: download -> verify -> load -> split ------------------------------------------

def test_retina_end_to_end(tmp_path):
    data = retina_archive()
    with serve({"/retina.zip": data}) as (url, srv):
        dest = dl.download("retina", root=tmp_path, url=f"{url}/retina.zip", sha256=sha(data), progress=False)
    assert dest == tmp_path / "retina"
    assert sorted(os.listdir(tmp_path)) == ["retina"]          # no .part, no temp folder left
    src = json.loads((dest / "SOURCE.json").read_text())
    assert src["sha256"] == sha(data) and src["sha256_checked"] is True and src["bytes"] == len(data)
    assert (dest / "dataset" / "2_glaucoma").is_dir()

    report = dl.verify("retina", root=tmp_path)
    assert report.status == "partial" and report.images == 10 and report.patients == 10
    assert report.counts() == {"normal": 4, "cataract": 2, "glaucoma": 2, "retina_disease": 2}
    assert report.table.loc["glaucoma", "published"] == 101 and report.table.loc["glaucoma", "diff"] == -99
    text = report.text()
    assert "PARTIAL" in text and "601" in text and "own patient" in text

    index = load_dataset("retina", root=tmp_path)
    assert index.classes == ["normal", "cataract", "glaucoma", "retina_disease"]
    assert len(index) == 10 and (index.records["patient"] == index.records["image"]).all()
    assert "own patient" in index.info["patient_note"]
    assert index.load_image(index.records["image"].iloc[0]).shape == (8, 8, 3)
    maybe_split(index)


def test_bladder_end_to_end(tmp_path):
    data = bladder_archive()
    with serve({"/records/7741476/files/baldder_tissue_classification.zip": data}) as (url, srv):
        dest = dl.download("bladder", root=tmp_path, progress=False, sha256=sha(data),
                           url=f"{url}/records/7741476/files/baldder_tissue_classification.zip?download=1")
    assert sorted(os.listdir(tmp_path)) == ["bladder"]
    assert (dest / "annotations.csv").exists() and (dest / "HGC" / "case1_001.png").exists()
    assert json.loads((dest / "SOURCE.json").read_text())["file"] == "baldder_tissue_classification.zip"

    report = dl.verify("bladder", root=tmp_path)
    assert report.status == "partial" and report.images == 11 and report.patients == 4
    assert report.counts() == {"HGC": 3, "LGC": 3, "NST": 3, "NTL": 2}
    assert report.table["published"].isna().all()
    text = report.text()
    assert "1754" in text and "WLI 8" in text and "NBI 3" in text and "train 6" in text

    index = load_dataset("bladder", root=tmp_path)
    assert index.classes == ["HGC", "LGC", "NST", "NTL"] and len(index) == 11
    assert set(index.records["patient"]) == {"1", "2", "3", "4"}
    assert index.records.set_index("image").loc["case3_001", "official_split"] == "val"
    assert set(index.records["imaging"]) == {"WLI", "NBI"}
    wli = load_dataset("bladder", root=tmp_path, imaging="wli")
    nbi = load_dataset("bladder", root=tmp_path, imaging="NBI")
    assert len(wli) == 8 and len(nbi) == 3 and set(nbi.records["imaging"]) == {"NBI"}
    with pytest.raises(DvlibError, match="imaging must be"):
        load_dataset("bladder", root=tmp_path, imaging="white")
    maybe_split(index)


def test_pad_ufes_end_to_end(tmp_path):
    data = pad_archive()
    with serve({"/zr7vgbcyr2-1.zip": data}) as (url, srv):
        dest = dl.download("pad_ufes_20", root=tmp_path, url=f"{url}/zr7vgbcyr2-1.zip",
                           sha256=sha(data).upper(), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["pad_ufes_20"]
    assert not list((dest / "images").glob("*.zip")), "nested imgs_part_*.zip must be unpacked"
    assert (dest / "images" / "imgs_part_2" / "PAT_5_6_17.png").exists()

    report = dl.verify("pad_ufes_20", root=tmp_path)
    assert report.status == "partial" and report.images == 10 and report.patients == 8
    assert report.counts() == {"ACK": 1, "BCC": 4, "MEL": 1, "NEV": 1, "SCC": 1, "SEK": 2}
    assert "PARTIAL" in report.text() and "2298" in report.text()

    index = load_dataset("pad_ufes_20", root=tmp_path)
    assert len(index) == 10 and index.records["patient"].nunique() == 8
    maybe_split(index)


def test_registry_urls_and_complete_status(tmp_path, monkeypatch):
    """With no url/sha256 arguments the registry's are used; matching counts verify as complete."""
    data = retina_archive()
    with serve({"/master.zip": data}) as (url, srv):
        patched = dataclasses.replace(dl.SOURCES["retina"], urls=(f"{url}/missing.zip", f"{url}/master.zip"),
                                      sha256=sha(data), images=10,
                                      classes={"normal": 4, "cataract": 2, "glaucoma": 2, "retina_disease": 2})
        monkeypatch.setitem(dl.SOURCES, "retina", patched)
        dl.download("retina", root=tmp_path, progress=False)
    assert [p for p, _ in srv.requests] == ["/missing.zip", "/master.zip"]   # falls back to the next URL
    report = dl.verify("retina", root=tmp_path)
    assert report.ok and report.status == "complete" and "COMPLETE" in report.text()
    assert json.loads((tmp_path / "retina" / "SOURCE.json").read_text())["sha256_from"] == "dvlib registry"


def test_default_root_is_dvlib_data(tmp_path, monkeypatch):
    data = retina_archive()
    monkeypatch.setenv("DVLIB_DATA", str(tmp_path / "store"))
    with serve({"/r.zip": data}) as (url, srv):
        dest = dl.download("retina", url=f"{url}/r.zip", sha256=sha(data), progress=False)
    assert dest == tmp_path / "store" / "retina"
    assert dl.verify("retina").images == 10


# --- hashes -----------------------------------------------------------------------------------

def test_unknown_hash_refuses_before_downloading(tmp_path):
    data = retina_archive()
    before = listing(tmp_path)
    with serve({"/r.zip": data}) as (url, srv):
        with pytest.raises(DvlibError, match=r"no sha256 is known.*--sha256.*--no-verify-hash"):
            dl.download("retina", root=tmp_path, url=f"{url}/r.zip", progress=False)
    assert srv.requests == [] and listing(tmp_path) == before


def test_no_verify_hash_records_computed_hash(tmp_path, capsys):
    data = retina_archive()
    with serve({"/r.zip": data}) as (url, srv):
        dest = dl.download("retina", root=tmp_path, url=f"{url}/r.zip", verify_hash=False, progress=False)
    src = json.loads((dest / "SOURCE.json").read_text())
    assert src["sha256"] == sha(data) and src["sha256_checked"] is False and src["sha256_expected"] is None
    assert sha(data) in capsys.readouterr().err
    assert "NOT checked" in dl.verify("retina", root=tmp_path).text()


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(DvlibError, match="64 hexadecimal"):
        dl.download("retina", root=tmp_path, url="http://127.0.0.1:9/x.zip", sha256="abc")


# --- failures leave nothing behind ------------------------------------------------------------

def test_checksum_mismatch(tmp_path):
    data = retina_archive()
    (tmp_path / "other").mkdir()
    before = listing(tmp_path)
    wrong = "0" * 64
    with serve({"/r.zip": data}) as (url, srv):
        with pytest.raises(DvlibError) as e:
            dl.download("retina", root=tmp_path, url=f"{url}/r.zip", sha256=wrong, progress=False)
    msg = str(e.value)
    assert "r.zip" in msg and wrong in msg and sha(data) in msg and "deleted" in msg
    assert listing(tmp_path) == before


def test_truncated_archive(tmp_path):
    data = retina_archive()
    cut = data[: len(data) // 2]
    before = listing(tmp_path)
    with serve({"/r.zip": cut}) as (url, srv):
        with pytest.raises(DvlibError, match=r"r\.zip.*(truncated|corrupt)"):
            dl.download("retina", root=tmp_path, url=f"{url}/r.zip", sha256=sha(cut), progress=False)
    assert listing(tmp_path) == before


def test_corrupt_member_in_archive(tmp_path):
    data = bytearray(retina_archive())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        member = next(m for m in z.infolist() if m.filename.endswith(".png"))
    start = member.header_offset + 30 + len(member.filename.encode())   # no extra field from writestr
    data[start:start + member.compress_size] = b"\xff" * member.compress_size   # CRC/deflate error
    data = bytes(data)
    before = listing(tmp_path)
    with serve({"/r.zip": data}) as (url, srv):
        with pytest.raises(DvlibError, match=r"r\.zip: corrupt or truncated archive"):
            dl.download("retina", root=tmp_path, url=f"{url}/r.zip", sha256=sha(data), progress=False)
    assert listing(tmp_path) == before


def test_local_tar_archive_via_file_url(tmp_path):
    """A hand-downloaded archive installs with --url file://...; tar archives work too."""
    import tarfile

    src_zip = zipfile.ZipFile(io.BytesIO(retina_archive()))
    tar_path = tmp_path / "retina.tar.gz"
    with tarfile.open(tar_path, "w:gz") as t:
        for m in src_zip.infolist():
            payload = src_zip.read(m)
            ti = tarfile.TarInfo(m.filename)
            ti.size = len(payload)
            t.addfile(ti, io.BytesIO(payload))
    root = tmp_path / "root"
    dest = dl.download("retina", root=root, url=tar_path.as_uri(), sha256=sha(tar_path.read_bytes()),
                       progress=False)
    assert sorted(os.listdir(root)) == ["retina"] and len(load_dataset("retina", root=root)) == 10
    assert json.loads((dest / "SOURCE.json").read_text())["file"] == "retina.tar.gz"


def test_missing_class_folder(tmp_path):
    data = retina_archive(skip=("2_glaucoma",))
    before = listing(tmp_path)
    with serve({"/r.zip": data}) as (url, srv):
        with pytest.raises(DvlibError, match=r"2_glaucoma.*nothing was installed"):
            dl.download("retina", root=tmp_path, url=f"{url}/r.zip", sha256=sha(data), progress=False)
    assert listing(tmp_path) == before


def test_bladder_csv_missing_column(tmp_path):
    data = bladder_archive(drop="case number")
    before = listing(tmp_path)
    with serve({"/b.zip": data}) as (url, srv):
        with pytest.raises(DvlibError) as e:
            dl.download("bladder", root=tmp_path, url=f"{url}/b.zip", sha256=sha(data), progress=False)
    msg = str(e.value)
    assert "annotations.csv" in msg and "'case'" in msg and "case_number" in msg and "columns found" in msg
    assert listing(tmp_path) == before


def test_pad_archive_without_metadata(tmp_path):
    data = make_zip({"images/imgs_part_1.zip": make_zip({"imgs_part_1/PAT_1_1_1.png": png(1)})})
    before = listing(tmp_path)
    with serve({"/p.zip": data}) as (url, srv):
        with pytest.raises(DvlibError, match="metadata.csv"):
            dl.download("pad_ufes_20", root=tmp_path, url=f"{url}/p.zip", sha256=sha(data), progress=False)
    assert listing(tmp_path) == before


def test_http_404_and_existing_folder(tmp_path):
    before = listing(tmp_path)
    with serve({}) as (url, srv):
        with pytest.raises(DvlibError, match="HTTP 404"):
            dl.download("retina", root=tmp_path, url=f"{url}/nope.zip", sha256="a" * 64, progress=False)
    assert listing(tmp_path) == before
    (tmp_path / "retina").mkdir()
    with pytest.raises(DvlibError, match="already exists"):
        dl.download("retina", root=tmp_path, url=f"{url}/nope.zip", sha256="a" * 64)


def test_missing_root_is_not_left_behind(tmp_path):
    root = tmp_path / "new" / "root"
    with serve({}) as (url, srv):
        with pytest.raises(DvlibError):
            dl.download("retina", root=root, url=f"{url}/nope.zip", sha256="a" * 64, progress=False)
    assert not root.exists()


# --- resuming ---------------------------------------------------------------------------------

def test_resume_from_existing_part_file(tmp_path):
    data = pad_archive()
    url_path = "/zr7vgbcyr2-1.zip"
    with serve({url_path: data}) as (url, srv):
        part = dl.partial_path("pad_ufes_20", tmp_path, url=url + url_path)
        assert part == tmp_path / ".downloads" / "pad_ufes_20" / "zr7vgbcyr2-1.zip.part"
        part.parent.mkdir(parents=True)
        k = len(data) // 3
        part.write_bytes(data[:k])
        dl.download("pad_ufes_20", root=tmp_path, url=url + url_path, sha256=sha(data), progress=False)
    assert srv.requests == [(url_path, f"bytes={k}-")]
    assert srv.sent == len(data) - k                    # only the missing bytes were transferred
    assert sorted(os.listdir(tmp_path)) == ["pad_ufes_20"]
    assert dl.verify("pad_ufes_20", root=tmp_path).images == 10


def test_resume_when_server_ignores_range(tmp_path):
    data = retina_archive()
    with serve({"/r.zip": data}, support_range=False) as (url, srv):
        part = dl.partial_path("retina", tmp_path, url=f"{url}/r.zip")
        part.parent.mkdir(parents=True)
        part.write_bytes(b"stale bytes from another file")
        dl.download("retina", root=tmp_path, url=f"{url}/r.zip", sha256=sha(data), progress=False)
    assert srv.sent == len(data) and sorted(os.listdir(tmp_path)) == ["retina"]


def test_complete_part_file_gets_416(tmp_path):
    data = retina_archive()
    with serve({"/r.zip": data}) as (url, srv):
        part = dl.partial_path("retina", tmp_path, url=f"{url}/r.zip")
        part.parent.mkdir(parents=True)
        part.write_bytes(data)
        dl.download("retina", root=tmp_path, url=f"{url}/r.zip", sha256=sha(data), progress=False)
    assert srv.sent == 0 and (tmp_path / "retina" / "SOURCE.json").exists()


def test_interrupted_download_keeps_part_and_resumes(tmp_path):
    data = bladder_archive()
    k = len(data) // 2
    with serve({"/b.zip": data}, drop_after=k) as (url, srv):
        with pytest.raises(DvlibError, match=r"interrupted at \d+ of \d+ bytes.*resume"):
            dl.download("bladder", root=tmp_path, url=f"{url}/b.zip", sha256=sha(data), progress=False)
        part = dl.partial_path("bladder", tmp_path, url=f"{url}/b.zip")
        assert part.stat().st_size == k
        assert not (tmp_path / "bladder").exists()
        srv.drop_after = None
        dl.download("bladder", root=tmp_path, url=f"{url}/b.zip", sha256=sha(data), progress=True)
    assert srv.requests[-1] == ("/b.zip", f"bytes={k}-")
    assert not part.exists() and sorted(os.listdir(tmp_path)) == ["bladder"]


# --- loaders directly -------------------------------------------------------------------------

def _write_bladder_folder(folder: Path, header, rows=BLADDER_ROWS, csv_name="annotations.csv"):
    folder.mkdir(parents=True)
    (folder / csv_name).write_bytes(bladder_csv(header=header, rows=rows))
    for k, (name, tissue, *_r) in enumerate(rows):
        (folder / tissue).mkdir(exist_ok=True)
        (folder / tissue / name).write_bytes(png(k))


def test_bladder_column_aliases(tmp_path):
    _write_bladder_folder(tmp_path / "bladder", ("HLY", "Tissue Type", "imaging_type", "Case", "split"),
                          csv_name="labels.csv")
    index = load_dataset("bladder", root=tmp_path)
    assert len(index) == 11 and index.info["columns"]["image"] == "HLY"
    assert index.info["columns"]["case"] == "Case"


def test_bladder_without_split_column_and_bad_values(tmp_path):
    rows = [r[:4] for r in BLADDER_ROWS]
    _write_bladder_folder(tmp_path / "bladder", BLADDER_HEADER[:4], rows=rows)
    index = load_dataset("bladder", root=tmp_path)
    assert (index.records["official_split"] == "").all() and "no split column" in index.info["official_split"]
    csv = tmp_path / "bladder" / "annotations.csv"
    csv.write_text(csv.read_text().replace("HGC", "CANCER", 1))
    with pytest.raises(DvlibError, match=r"annotations\.csv.*'tissue type'.*CANCER"):
        load_dataset("bladder", root=tmp_path)


def test_bladder_missing_image_files(tmp_path):
    _write_bladder_folder(tmp_path / "bladder", BLADDER_HEADER)
    (tmp_path / "bladder" / "HGC" / "case1_001.png").unlink()
    index = load_dataset("bladder", root=tmp_path)
    assert len(index) == 10 and index.info["rows_without_images"] == 1
    with pytest.raises(DvlibError, match="1 rows of annotations.csv have no image file"):
        load_dataset("bladder", root=tmp_path, strict=True)


def test_retina_flat_layout_and_missing_folder(tmp_path):
    for folder, n in RETINA_COUNTS.items():
        (tmp_path / "retina" / folder).mkdir(parents=True)
        for k in range(n):
            (tmp_path / "retina" / folder / f"x{k}.jpg").write_bytes(b"")
    assert len(load_dataset("retina", root=tmp_path)) == 10
    for p in (tmp_path / "retina" / "3_retina_disease").iterdir():
        p.unlink()
    with pytest.raises(DvlibError, match="without images.*3_retina_disease"):
        load_dataset("retina", root=tmp_path)
    (tmp_path / "retina" / "3_retina_disease").rmdir()
    with pytest.raises(DvlibError, match="missing class folder.*3_retina_disease"):
        load_dataset("retina", root=tmp_path)


# --- the real partial PAD-UFES-20 copy --------------------------------------------------------

@pytest.mark.skipif(not (SHARED / "pad_ufes_20" / "metadata.csv").exists(),
                    reason="shared PAD-UFES-20 copy not present")
def test_verify_shared_partial_pad_ufes(monkeypatch):
    monkeypatch.setenv("DVLIB_DATA", str(SHARED))
    report = dl.verify("pad_ufes_20")
    assert report.status == "partial" and not report.ok
    assert report.images == 1233 and report.patients == 906
    assert report.counts() == {"ACK": 324, "BCC": 399, "MEL": 49, "NEV": 223, "SCC": 71, "SEK": 167}
    assert report.table.loc["BCC", "published"] == 845 and report.table.loc["BCC", "diff"] == -446
    text = report.text()
    assert "PARTIAL: only 1233 of the 2298 published images" in text
    assert "906 of 1373 patients" in text and "1065 have no image file" in text


# --- info, paper results, CLI -----------------------------------------------------------------

def test_info_entries():
    for name in ("retina", "bladder", "pad_ufes_20"):
        d = dl.info(name)
        assert d["urls"] and d["licence"] and d["citation"] and d["published"]["images"]
        assert d["sha256"] is None          # never claim a hash that was not computed
    assert dl.info("retina")["published"] == {"images": 601, "patients": None, "classes": {
        "normal": 300, "cataract": 100, "glaucoma": 101, "retina_disease": 100}}
    assert dl.info("bladder")["published"]["images"] == 1754 and dl.info("bladder")["published"]["patients"] == 23
    pad = dl.info("pad_ufes_20")["published"]
    assert pad["images"] == 2298 and pad["patients"] == 1373 and sum(pad["classes"].values()) == 2298
    assert sum(dl.info("retina")["published"]["classes"].values()) == 601
    assert "7741476" in dl.info("bladder")["homepage"] and "zr7vgbcyr2" in dl.info("pad_ufes_20")["urls"][0]
    assert "yiweichen04/retina_dataset" in dl.info("retina")["urls"][0]
    with pytest.raises(DvlibError, match="no download source"):
        dl.info("imagefolder")


def test_paper_results():
    df = paper_results()
    assert list(df.columns) == ["dataset", "part", "method", "accuracy"] and len(df) == 3 * (16 + 1)
    get = df.set_index(["dataset", "part", "method"])["accuracy"]
    assert get[("retina", 3, "data_vector")] == 72.37
    assert get[("bladder", 1, "random_vector")] == 20.1
    assert get[("pad_ufes_20", 2, "random_vector")] == 5.85
    assert get[("bladder", 2, "base_model")] == 60.31
    full = df[df["method"] == "full_training"].set_index("dataset")["accuracy"].to_dict()
    assert full == {"retina": 73.48, "bladder": 63.49, "pad_ufes_20": 68.36}
    assert df[df["method"] == "full_training"]["part"].isna().all()
    assert "73.40" in PAPER_RESULTS["retina"]["note"]
    assert paper_table("pad_ufes_20").loc[3, "Data Vector"] == 66.4
    assert len(paper_results("bladder")) == 17
    with pytest.raises(DvlibError):
        paper_results("mnist")


def test_paper_numbers_match_paper_file():
    paper = Path("/work/shared/paper/data-vectors-paper.md")
    if not paper.exists():
        pytest.skip("paper file not present")
    text = paper.read_text()
    for name, entry in PAPER_RESULTS.items():
        block = text.split(f"Table {entry['table']}:")[1]
        for part, values in entry["parts"].items():
            line = next(ln for ln in block.splitlines() if ln.startswith(f"{part}\t"))
            printed = [float(x) for x in line.split("\t")[1:5]]
            assert printed == list(values), (name, part)


def _parser():
    from dvlib.cli import data_cmds

    parser = argparse.ArgumentParser(prog="dvlib")
    data_cmds.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["data", "info", "bladder"])
    assert args.func(args) == 0 and "Lazo" in capsys.readouterr().out
    args = parser.parse_args(["data", "info", "retina", "--json"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["published"]["images"] == 601
    for sub in ("download", "verify", "info"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["data", sub, "--help"])
        assert e.value.code == 0
    assert "--no-verify-hash" in capsys.readouterr().out

    data = retina_archive()
    with serve({"/r.zip": data}) as (url, srv):
        args = parser.parse_args(["data", "download", "retina", "--root", str(tmp_path), "--url", f"{url}/r.zip"])
        with pytest.raises(DvlibError, match="no sha256 is known"):
            args.func(args)
        args = parser.parse_args(["data", "download", "retina", "--root", str(tmp_path), "--url", f"{url}/r.zip",
                                  "--sha256", sha(data), "--no-progress"])
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "installed in" in out and sha(data) in out and "PARTIAL" in out
    args = parser.parse_args(["data", "verify", "retina", "--root", str(tmp_path)])
    assert args.func(args) == 1
    args = parser.parse_args(["data", "verify", "retina", "--root", str(tmp_path), "--allow-partial"])
    assert args.func(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "verify", "mnist"])
