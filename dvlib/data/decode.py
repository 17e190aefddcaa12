"""Decode one image file as it looks: RGB uint8 (H, W, 3), or a DvlibError naming the file.

``convert("RGB")`` alone gets several PIL modes wrong (a 16-bit grey PNG clips to white, alpha is
dropped, EXIF orientation is ignored). :func:`read_rgb` first turns the image upright (EXIF
orientation, ``PIL.ImageOps.exif_transpose``), then by mode:

- ``RGB`` ``L`` ``1`` ``CMYK`` ``YCbCr`` ``LAB`` ``HSV`` ``RGBX``: PIL's conversion to RGB.
- ``RGBA`` ``LA`` ``PA``, and ``P`` ``L`` ``RGB`` with a transparent colour: composited on black,
  ``round(rgb * alpha / 255)``. Black because fundus, endoscopy and dermoscopy photographs are
  framed by black: a transparent margin becomes the frame it replaces, not a bright border.
  ``RGBa`` ``La`` (premultiplied) already hold exactly that: their colour channels are taken.
- ``I;16`` ``I;16L`` ``I;16B`` ``I;16N`` (16-bit grey): ``v >> 8``, the reduction PIL itself
  applies to 16-bit colour PNGs, so grey and colour 16-bit files agree; a 16-bit copy of an 8-bit
  image (``v * 257``) decodes to that 8-bit image exactly.
- ``I`` (32-bit integer): negative values are refused; otherwise the bit depth is the smallest of
  8, 16 and 31 that holds the image's maximum, and ``v >> (depth - 8)``.
- ``F`` (32-bit float): values in [0, 1] become ``255 * v`` rounded; any other range, NaN or inf is
  refused (nothing in the file says what they mean).
- any other mode is refused by name.

An image over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89.5 million by default: 4000 x 6000 photos
pass) is refused with its pixel count, as PIL refuses one over twice that; every exception PIL
raises on a file becomes a :class:`~dvlib.io.DvlibError` naming it.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from dvlib.io import DvlibError

AS_RGB = ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
WITH_ALPHA = ("RGBA", "LA", "PA")
PREMULTIPLIED = ("RGBa", "La")
GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")
MODES = (*AS_RGB, *WITH_ALPHA, *PREMULTIPLIED, "P", *GREY_16, "I", "F")

# read_rgb refuses what this warning is about (between the limit and twice it): printing it adds noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as it looks, RGB uint8 (H, W, 3); see the module docstring for the rules."""
    try:
        with Image.open(path) as im:
            check_pixels(path, im.size)
            im.load()  # decode now, so that a truncated file fails here
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
            return to_rgb(im, path)
    except DvlibError:
        raise
    except FileNotFoundError:
        raise DvlibError(f"image file not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise DvlibError(f"{path}: too large to decode: {e} Downscale it (dvlib's limit is "
                         f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels).") from None
    except MemoryError:
        raise DvlibError(f"{path}: not enough memory to decode this image") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise DvlibError(f"corrupt or unreadable image file: {path} ({str(e) or type(e).__name__})") from e


def check_pixels(path, size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = int(size[0]) * int(size[1])
    if limit is not None and pixels > limit:
        raise DvlibError(f"{path}: too large to decode: image size ({size[0]} x {size[1]} = {pixels} pixels) "
                         f"exceeds the limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); downscale it, "
                         "or raise that limit if the file is trusted")


def to_rgb(im: Image.Image, path) -> np.ndarray:
    """An opened image as RGB uint8 by the rules of its mode."""
    mode = im.mode
    if mode in WITH_ALPHA or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        return on_black(np.asarray(im.convert("RGBA")))
    if mode in AS_RGB or mode == "P":
        return np.asarray(im.convert("RGB"))
    if mode in PREMULTIPLIED:
        a = np.asarray(im)
        return np.ascontiguousarray(a[..., :3]) if mode == "RGBa" else grey(a[..., 0])
    if mode in GREY_16:
        return grey((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
    if mode == "I":
        return grey(int32_to_8bit(np.asarray(im), path))
    if mode == "F":
        return grey(float_to_8bit(np.asarray(im), path))
    raise DvlibError(f"{path}: image mode {mode!r} is not supported; dvlib reads {', '.join(MODES)}")


def on_black(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 composited on black, rounded to the nearest integer (no ties: 255 is odd)."""
    rgb = rgba[..., :3].astype(np.uint16) * rgba[..., 3:].astype(np.uint16)
    return ((rgb + 127) // 255).astype(np.uint8)


def grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def int32_to_8bit(a: np.ndarray, path) -> np.ndarray:
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        raise DvlibError(f"{path}: 32-bit integer image with negative values (minimum {lo}); "
                         "dvlib reads integer images with values >= 0")
    shift = 0 if hi < 2 ** 8 else 8 if hi < 2 ** 16 else 23  # 8, 16 or 31 significant bits
    return (a >> shift).astype(np.uint8)


def float_to_8bit(a: np.ndarray, path) -> np.ndarray:
    if a.size and not np.isfinite(a).all():
        raise DvlibError(f"{path}: float image with NaN or infinite values; dvlib reads float images "
                         "only with values in [0, 1]")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise DvlibError(f"{path}: float image with values in [{float(a.min()):g}, {float(a.max()):g}]; "
                         "dvlib reads float images only with values in [0, 1] (scaled by 255)")
    return np.rint(a.astype(np.float64) * 255).astype(np.uint8)
