"""Images decoded as they look, or refused naming the file; hidden files never taken for images.

First :func:`dvlib.data.read_rgb` on files made here with PIL, against references computed here
(16-bit and 32-bit integer, float, palette, alpha, EXIF orientations, truncated files, decompression
bombs, every kind of exception PIL raises); then the image-folder index (hidden files and folders
skipped and counted); then the real command line where a user meets them: ``dvlib site finetune`` on
a folder of such files trains exactly what it trains on the same pictures stored plainly, and a bad
file stops it with exit code 2, a message naming the file and nothing written.
"""
from __future__ import annotations

import hashlib
import re
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

from dvlib.cli import main
from dvlib.data import load_dataset, read_rgb
from dvlib.data.decode import to_rgb
from dvlib.files import read
from dvlib.io import DvlibError

FINETUNE = ["--preset", "smoke", "--arch", "smallcnn", "--weights", "random", "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--seed", "0", "--site", "site"]
# the display transform of each EXIF orientation, from the EXIF 2.3 definitions (row 0 / column 0 -> side)
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


def grey3(a: np.ndarray) -> np.ndarray:
    return np.stack([a, a, a], axis=-1).astype(np.uint8)


def on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.round(rgb.astype(np.float64) * alpha[..., None].astype(np.float64) / 255).astype(np.uint8)


def with_orientation(im: Image.Image, path: Path, orientation: int, **kw) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, **kw)
    return path


def palette_png(path: Path, idx: np.ndarray, palette: np.ndarray, alpha: np.ndarray | None = None) -> Path:
    im = Image.frombytes("P", (idx.shape[1], idx.shape[0]), idx.astype(np.uint8).tobytes())
    im.putpalette(palette.astype(np.uint8).ravel().tolist())
    im.save(path, **({} if alpha is None else {"transparency": bytes(alpha.astype(np.uint8).tolist())}))
    return path


# ------------------------------------------------------------------------------ modes, scaled

@pytest.mark.parametrize("fmt, dtype", [("png", "<u2"), ("tiff", "<u2"), ("tiff", ">u2")])
def test_16bit_grey_is_scaled_by_its_bit_depth_not_clipped_to_white(tmp_path, fmt, dtype):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, (24, 40)).astype(np.uint16)
    a[0] = np.linspace(0, 65535, 40).astype(np.uint16)  # a full-range gradient on the first row
    path = tmp_path / f"g16.{fmt}"
    Image.fromarray(a.astype(dtype)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    got = read_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (24, 40, 3)
    np.testing.assert_array_equal(got, grey3(a // 256))
    assert (got == 255).mean() < 0.01  # the bug: 99.6 % white
    eight = rng.integers(0, 256, (24, 40)).astype(np.uint16)  # a 16-bit copy of an 8-bit image
    Image.fromarray((eight * 257).astype(dtype)).save(path)
    np.testing.assert_array_equal(read_rgb(path), grey3(eight))


@pytest.mark.parametrize("top, divisor", [(255, 1), (65535, 256), (2 ** 31 - 1, 2 ** 23)])
def test_32bit_integer_is_scaled_by_its_range(tmp_path, top, divisor):
    rng = np.random.default_rng(1)
    a = rng.integers(0, top, (10, 12), endpoint=True).astype(np.int64)
    a[0, 0] = top
    path = tmp_path / "i32.tiff"
    Image.fromarray(a.astype(np.int32)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(read_rgb(path), grey3(a // divisor))


def test_32bit_integer_with_negative_values_is_refused(tmp_path):
    path = tmp_path / "neg.tiff"
    Image.fromarray(np.array([[0, -5], [7, 300]], np.int32)).save(path)
    with pytest.raises(DvlibError, match=re.escape(f"{path}: 32-bit integer image with negative values (minimum -5)")):
        read_rgb(path)


def test_float_in_unit_range_is_scaled_and_other_floats_are_refused(tmp_path):
    k = np.random.default_rng(2).integers(0, 256, (8, 9))
    k[0, :2] = [0, 255]
    path = tmp_path / "f.tiff"
    Image.fromarray((k / 255).astype(np.float32)).save(path)
    with Image.open(path) as im:
        assert im.mode == "F"
    np.testing.assert_array_equal(read_rgb(path), grey3(k))
    Image.fromarray(np.array([[-0.5, 0.0], [1.0, 2.0]], np.float32)).save(path)
    with pytest.raises(DvlibError, match=re.escape(f"{path}: float image with values in [-0.5, 2]")):
        read_rgb(path)
    Image.fromarray(np.array([[np.nan, 0.5]], np.float32)).save(path)
    with pytest.raises(DvlibError, match=re.escape(f"{path}: float image with NaN")):
        read_rgb(path)


# ------------------------------------------------------------------------ palette and alpha

def test_palette_with_and_without_transparency(tmp_path):
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 16, (12, 14))
    palette = rng.integers(0, 256, (256, 3))
    np.testing.assert_array_equal(read_rgb(palette_png(tmp_path / "p.png", idx, palette)), palette[idx])
    alpha = rng.integers(0, 256, 256)
    alpha[:3] = [0, 255, 128]  # fully transparent, opaque and half
    got = read_rgb(palette_png(tmp_path / "pt.png", idx, palette, alpha))
    np.testing.assert_array_equal(got, on_black(palette[idx], alpha[idx]))
    assert (got[idx == 0] == 0).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_black(tmp_path, mode):
    rng = np.random.default_rng(4)
    colour = rng.integers(0, 256, (10, 11, 3 if mode == "RGBA" else 1)).astype(np.uint8)
    alpha = rng.integers(0, 256, (10, 11)).astype(np.uint8)
    alpha[0] = 255
    Image.fromarray(np.dstack([colour, alpha])).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == mode
    got = read_rgb(tmp_path / "a.png")
    want = on_black(np.broadcast_to(colour, (10, 11, 3)), alpha)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[0], np.broadcast_to(colour, (10, 11, 3))[0])  # opaque: unchanged


def test_grey_and_rgb_with_a_transparent_colour(tmp_path):
    rgb = np.random.default_rng(5).integers(1, 256, (6, 7, 3)).astype(np.uint8)
    rgb[2, 3] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "t.png", transparency=(10, 20, 30))
    want = rgb.copy()
    want[(rgb == (10, 20, 30)).all(-1)] = 0
    np.testing.assert_array_equal(read_rgb(tmp_path / "t.png"), want)


def test_premultiplied_alpha_on_black_is_its_colour_channels():
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(rgba).convert("RGBa"), "x"),
                                  np.asarray(Image.fromarray(rgba).convert("RGBa"))[..., :3])
    la = Image.merge("La", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])])
    np.testing.assert_array_equal(to_rgb(la, "x"), grey3(rgba[..., 0]))


@pytest.mark.parametrize("mode, fmt", [("1", "png"), ("L", "png"), ("L", "jpeg"), ("CMYK", "jpeg"), ("RGB", "jpeg")])
def test_plain_modes_convert_as_pil_does(tmp_path, mode, fmt):
    rgb = np.random.default_rng(7).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(rgb).convert(mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
        want = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(read_rgb(path), want)


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(DvlibError, match="img.png: image mode 'I;16S' is not supported; dvlib reads RGB, L"):
        to_rgb(SimpleNamespace(mode="I;16S", info={}), "img.png")


# ------------------------------------------------------------------------------ orientation

@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.random.default_rng(8).integers(0, 256, (6, 10, 3)).astype(np.uint8)
    path = with_orientation(Image.fromarray(stored), tmp_path / "o.png", orientation)
    np.testing.assert_array_equal(read_rgb(path), UPRIGHT[orientation](stored))


def test_exif_orientation_with_palette_16bit_and_alpha(tmp_path):
    rng = np.random.default_rng(12)
    idx, palette, alpha = rng.integers(0, 8, (6, 10)), rng.integers(0, 256, (256, 3)), rng.integers(0, 256, 256)
    im = Image.open(palette_png(tmp_path / "p.png", idx, palette, alpha))
    path = with_orientation(im, tmp_path / "po.png", 6, transparency=bytes(alpha.astype(np.uint8).tolist()))
    np.testing.assert_array_equal(read_rgb(path), np.rot90(on_black(palette[idx], alpha[idx]), -1))
    g = rng.integers(0, 65536, (6, 10)).astype(np.uint16)
    path = with_orientation(Image.fromarray(g), tmp_path / "g.png", 8)
    np.testing.assert_array_equal(read_rgb(path), np.rot90(grey3(g // 256), 1))
    rgba = rng.integers(0, 256, (6, 10, 4)).astype(np.uint8)
    path = with_orientation(Image.fromarray(rgba), tmp_path / "a.png", 3)
    np.testing.assert_array_equal(read_rgb(path), on_black(rgba[..., :3], rgba[..., 3])[::-1, ::-1])


def test_exif_rotated_jpeg_shows_its_pattern_upright(tmp_path):
    stored = np.full((48, 64, 3), 128, np.uint8)
    stored[:16, :16] = (255, 0, 0)  # red in the stored top-left corner
    path = with_orientation(Image.fromarray(stored), tmp_path / "r.jpg", 6, quality=95)
    with Image.open(path) as im:
        raw = np.asarray(im.convert("RGB"))
    got = read_rgb(path)
    np.testing.assert_array_equal(got, np.rot90(raw, -1))
    assert got.shape == (64, 48, 3)
    corner = got[:16, -16:].reshape(-1, 3).mean(0)  # orientation 6: stored top-left shows top-right
    assert corner[0] > 200 and corner[1] < 50 and corner[2] < 50


# --------------------------------------------------------------------------- refused files

def _noise_file(path: Path, fmt: str, size=(64, 48)) -> bytes:
    rgb = np.random.default_rng(9).integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)
    return path.read_bytes()


@pytest.mark.parametrize("name, content", [
    ("half.png", lambda p: (b := _noise_file(p, "PNG"))[: len(b) // 2]),
    ("half.jpg", lambda p: (b := _noise_file(p, "JPEG"))[: len(b) // 2]),
    ("empty.png", lambda p: b""),
    ("text.jpg", lambda p: b"this is not an image"),
])
def test_bad_files_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content(path))
    with pytest.raises(DvlibError, match=re.escape(f"corrupt or unreadable image file: {path} (")):
        read_rgb(path)


@pytest.mark.parametrize("where", ["open", "exif_transpose"])
@pytest.mark.parametrize("error", [OSError("disk"), SyntaxError("bad"), ValueError("bad"), EOFError(), struct.error("x"),
                                   IndexError("x"), TypeError("x"), KeyError("x"), ZeroDivisionError("x"),
                                   RuntimeError("x"), Image.UnidentifiedImageError("x")])
def test_every_pil_exception_becomes_an_error_naming_the_file(tmp_path, monkeypatch, where, error):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(Image if where == "open" else ImageOps, where, fail)
    shown = str(error) or type(error).__name__
    with pytest.raises(DvlibError, match=re.escape(f"corrupt or unreadable image file: {path} ({shown})")):
        read_rgb(path)


def test_out_of_memory_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)

    def fail(*a, **k):
        raise MemoryError

    monkeypatch.setattr(ImageOps, "exif_transpose", fail)
    with pytest.raises(DvlibError, match=re.escape(f"{path}: not enough memory")):
        read_rgb(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the filter decode sets
def test_decompression_bombs_are_refused_with_their_pixel_count(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    for size in ((40, 30), (30, 40)):  # at the limit: decoded
        Image.new("RGB", size, (1, 2, 3)).save(tmp_path / "ok.png")
        assert read_rgb(tmp_path / "ok.png").shape == (size[1], size[0], 3)
    Image.new("RGB", (41, 30)).save(tmp_path / "over.png")  # over the limit: PIL only warns
    with pytest.raises(DvlibError, match=re.escape(f"{tmp_path / 'over.png'}: too large to decode: image size "
                                                   "(41 x 30 = 1230 pixels) exceeds the limit of 1200 pixels")):
        read_rgb(tmp_path / "over.png")
    with warnings.catch_warnings():  # a user's -W error turns PIL's warning into an exception
        warnings.simplefilter("error")
        with pytest.raises(DvlibError, match=re.escape(f"{tmp_path / 'over.png'}: too large to decode: ") + ".*1230 pixels"):
            read_rgb(tmp_path / "over.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")  # over twice the limit: PIL raises
    with pytest.raises(DvlibError, match=re.escape(f"{tmp_path / 'bomb.png'}: too large to decode: ") + ".*10000 pixels"):
        read_rgb(tmp_path / "bomb.png")


def test_a_4000_by_6000_photo_decodes_at_the_default_limit(tmp_path):
    Image.new("L", (6000, 4000), 7).save(tmp_path / "photo.png")
    got = read_rgb(tmp_path / "photo.png")
    assert got.shape == (4000, 6000, 3) and int(got.min()) == int(got.max()) == 7


# ---------------------------------------------------------------------------- hidden files

HIDDEN = ["a/.thumbnails/a0.png", "a/.thumbnails/big/a1.png", "a/@eaDir/a0.png/SYNOPHOTO_THUMB_M.jpg",
          "a/.DS_Store", "a/._a0.png", "b/__MACOSX/b/._b0.png", "b/Thumbs.db", "b/sub/.hidden.png",
          "@eaDir/b/x.png", ".DS_Store", "__MACOSX/a/a0.png"]


def make_folder(root: Path, n: int = 8, size=(24, 24)) -> list[str]:
    """Classes a and b of n plain RGB PNGs each (one in a sub-folder); returns their relative paths."""
    rng = np.random.default_rng(10)
    rel = [f"{c}/{c}{i}.png" if i else f"{c}/sub/{c}{i}.png" for c in "ab" for i in range(n)]
    for r in rel:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)).save(root / r)
    return rel


def add_hidden(root: Path) -> None:
    """Images a NAS or a Mac would leave (valid ones: trained on if not skipped) and junk (would fail)."""
    for r in HIDDEN:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        if r.endswith(".png") and "._" not in r:
            Image.new("RGB", (24, 24), (255, 255, 255)).save(root / r)
        else:
            (root / r).write_bytes(b"\x00\x05\x16\x07 not an image")


def test_hidden_files_anywhere_are_skipped_and_counted(tmp_path):
    root = tmp_path / "site"
    rel = make_folder(root, n=3)
    clean = load_dataset(str(root))
    assert "hidden_skipped" not in clean.summary()
    add_hidden(root)
    index = load_dataset(str(root))
    assert index.classes == ["a", "b"]
    assert sorted(index.records["path"]) == sorted(str(root / r) for r in rel)
    s = index.summary()
    assert s["images"] == 6 and s["hidden_skipped"] == len(HIDDEN)
    assert s["hidden_note"] == f"skipped {len(HIDDEN)} hidden files under {root}"
    assert index.records.equals(clean.records)


def test_a_class_of_hidden_files_only_has_no_images(tmp_path):
    root = tmp_path / "site"
    make_folder(root, n=2)
    (root / "c" / ".thumbnails").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "c" / ".thumbnails" / "c0.png")
    with pytest.raises(DvlibError, match=r"class folders without images: \['c'\] \(1 hidden files skipped\)"):
        load_dataset(str(root))


# ----------------------------------------------------------------- through the command line

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): ("folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def finetune(tmp_path: Path, site: Path, out: str, capsys, code: int = 0, *needles) -> str:
    """``dvlib site finetune`` on ``site``; a refusal must leave ``tmp_path`` exactly as it was."""
    before = snapshot(tmp_path)
    rc = main(["site", "finetune", "--data", str(site), *FINETUNE, "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert rc == code, err
    if code:
        assert err.startswith("dvlib: error: ") and "Traceback" not in err, err
        for n in needles:
            assert str(n) in err, f"{n!r} not in:\n{err}"
        assert snapshot(tmp_path) == before
    return err


def messy_copy(clean: Path, messy: Path, rel: list[str]) -> None:
    """The same pictures as ``clean``, stored as 16-bit grey, RGBA, palette with transparency, EXIF-rotated
    PNG and JPEG or plain; ``clean`` is rewritten to hold exactly what each should decode to."""
    rng = np.random.default_rng(11)
    for i, r in enumerate(rel):
        src, dst = clean / r, messy / r
        dst.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.asarray(Image.open(src).convert("RGB"))
        kind = i % 6
        if kind == 0:  # 16-bit grey; clean: its 8-bit grey
            g = rgb[..., 1].astype(np.uint16)
            Image.fromarray(g * 257).save(dst)
            Image.fromarray(grey3(g)).save(src)
        elif kind == 1:  # RGBA; clean: composited on black
            alpha = rng.integers(0, 256, rgb.shape[:2]).astype(np.uint8)
            Image.fromarray(np.dstack([rgb, alpha])).save(dst)
            Image.fromarray(on_black(rgb, alpha)).save(src)
        elif kind == 2:  # palette with transparent entries; clean: the palette colours on black
            idx, palette, alpha = rgb[..., 0] % 32, rng.integers(0, 256, (256, 3)), rng.integers(0, 256, 256)
            palette_png(dst, idx, palette, alpha)
            Image.fromarray(on_black(palette[idx], alpha[idx])).save(src)
        elif kind == 3:  # stored on its side, EXIF orientation 6 (PNG)
            with_orientation(Image.fromarray(np.rot90(rgb, 1).copy()), dst, 6)
        elif kind == 4:  # stored on its side, EXIF orientation 8 (JPEG); clean: the raw decode turned upright
            jpg = dst.with_suffix(".jpg")
            with_orientation(Image.fromarray(np.rot90(rgb, -1).copy()), jpg, 8, quality=95)
            with Image.open(jpg) as im:
                Image.fromarray(np.rot90(np.asarray(im.convert("RGB")), 1).copy()).save(src)
        else:
            dst.write_bytes(src.read_bytes())


def test_finetune_trains_on_images_as_they_look_and_skips_hidden_files(tmp_path, capsys):
    clean, messy = tmp_path / "clean" / "site", tmp_path / "messy" / "site"
    rel = make_folder(clean)
    messy_copy(clean, messy, rel)
    add_hidden(messy)
    finetune(tmp_path, clean, "clean.dv.safetensors", capsys)
    finetune(tmp_path, messy, "messy.dv.safetensors", capsys)
    meta_c, tensors_c = read(tmp_path / "clean.dv.safetensors")
    meta_m, tensors_m = read(tmp_path / "messy.dv.safetensors")
    assert meta_m["sample_count"] + meta_m["test_count"] == len(rel)
    for k in ("sample_count", "test_count", "train_class_counts", "metrics"):
        assert meta_m[k] == meta_c[k], k
    assert tensors_m.keys() == tensors_c.keys()
    for k in tensors_c:
        assert tensors_m[k].equal(tensors_c[k]), k
    assert load_dataset(str(messy)).summary()["hidden_skipped"] == len(HIDDEN)


def _bad(kind: str, path: Path) -> tuple[Path, list[str]]:
    if kind == "truncated_png":
        path.write_bytes(_noise_file(path, "PNG", (24, 24))[:300])
        return path, ["corrupt or unreadable image file", path]
    if kind == "truncated_jpeg":
        path = path.with_suffix(".jpg")
        path.write_bytes(_noise_file(path, "JPEG", (24, 24))[:400])
        return path, ["corrupt or unreadable image file", path]
    if kind == "not_an_image":
        path.write_bytes(b"<html>404 not found</html>")
        return path, ["corrupt or unreadable image file", path]
    if kind == "bomb_warned":  # over the (lowered) limit, under twice it
        Image.new("RGB", (40, 30)).save(path)
        return path, [f"{path}: too large to decode", "40 x 30 = 1200 pixels", "limit of 1000 pixels"]
    Image.new("RGB", (60, 60)).save(path)  # over twice the limit
    return path, [f"{path}: too large to decode", "3600 pixels", "MAX_IMAGE_PIXELS"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpeg", "not_an_image", "bomb_warned", "bomb"])
def test_finetune_refuses_a_bad_image_naming_it_and_writes_nothing(tmp_path, capsys, monkeypatch, kind):
    site = tmp_path / "site"
    make_folder(site, n=4)
    path, needles = _bad(kind, site / "b" / "zz_bad.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the good images are 24 x 24 = 576 pixels
    finetune(tmp_path, site, "v.dv.safetensors", capsys, 2, *needles)
