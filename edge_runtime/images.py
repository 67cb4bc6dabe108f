"""Image decoding and preprocessing: the one place where a cell photo becomes model input.

Training caches the output of :func:`prepare_cell` and the device calls the same function, so a cell looks the
same to the model on the laptop and on the Pi. Decoding is defensive: a field tool meets corrupt JPEGs, empty files,
16-bit TIFFs, palette PNGs and photos far too large to be a single cell.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")

# A segmented cell is ~100-150 px a side; a whole smear field from a phone is ~12 MP. Anything above this many
# pixels is refused before decoding (decompression bombs, or a whole slide photo passed by mistake).
MAX_PIXELS = 25_000_000

# The foreground (the cell) is everything brighter than this on the sum of channels; NIH cells sit on black.
FOREGROUND_MIN_SUM = 30

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input that cannot be turned into a cell image; the message says why in one line."""


def open_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB, raising :class:`ImageError` with a one-line reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"image is {width}x{height} px, too large to be a cell photo (limit {MAX_PIXELS:,} px); "
                        "crop single cells first")
                img.load()
                return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large to be a cell photo (limit {MAX_PIXELS:,} px)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (wrong or unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha is composited on black (the NIH background), 16-bit and float
    images are scaled from their own range, palette and grayscale images are expanded."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def array_to_image(arr: np.ndarray) -> Image.Image:
    """Accept HxW, HxWx1, HxWx3 or HxWx4 arrays (uint8, uint16 or float in [0, 1]) as an RGB image."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise ImageError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(arr))


def load_image(source: ImageInput) -> Image.Image:
    """Return an RGB Pillow image from a path, a Pillow image or an array."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    return open_image(source)


def normalize_stain(arr: np.ndarray, target_mean: tuple, target_std: tuple) -> np.ndarray:
    """Map the colour statistics of the cell (the non-black foreground) to fixed targets, per channel.

    Giemsa staining and microscope light differ between patients and slides; NIH attributes most of the gap between
    cell-level and patient-level accuracy to it. Matching each cell's foreground mean and spread to one target
    (Reinhard-style, in RGB) removes that nuisance before the network sees the cell. The background stays black.
    """
    pixels = arr.astype(np.float32)
    foreground = pixels.sum(axis=2) > FOREGROUND_MIN_SUM
    if foreground.sum() < 16:
        return arr
    cell = pixels[foreground]
    mean = cell.mean(axis=0)
    std = cell.std(axis=0) + 1e-3
    out = (pixels - mean) / std * np.asarray(target_std, np.float32) + np.asarray(target_mean, np.float32)
    out[~foreground] = 0.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def prepare_cell(source: ImageInput, size: int, stain: dict | None = None, central: bool = True) -> np.ndarray:
    """Decode ``source`` and return the model input: a ``size`` x ``size`` x 3 uint8 array.

    ``central``: first cut the crop's central cell as a field's cell is cut (tight box, masked on black; see
    ``segment.central_cell``), so a crop made by another tool, with glass and neighbours' edges, looks like an NIH
    crop; an NIH crop comes out essentially unchanged. Pass False for a cell already cut by ``segment.cut_cell``.
    ``stain`` is the card's stain-normalisation block (``{"mean": [r, g, b], "std": [r, g, b]}``) or None.
    Resizing is Pillow's antialiased bilinear, identical on every platform Pillow runs on.
    """
    img = load_image(source)
    if central:
        img = cut_central_cell(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if stain:
        arr = normalize_stain(arr, stain["mean"], stain["std"])
    return arr


def cut_central_cell(img: Image.Image) -> Image.Image:
    """The crop's central cell on black in its tight box. Without OpenCV, a crop already on black passes as it is
    (segmenting it would change next to nothing); one with natural background is refused with the install hint."""
    from . import segment
    arr = np.asarray(img, dtype=np.uint8)
    if min(arr.shape[:2]) < 8:
        raise ImageError(f"image is {arr.shape[1]}x{arr.shape[0]} px, too small to show a cell")
    if segment.cv2 is None:
        if segment.is_on_black(arr):
            return img
        raise ImageError(segment.OPENCV_HINT)
    region = segment.central_cell(arr)
    if region is None:
        raise ImageError("no cell found in the image (blank, all black or not a blood smear)")
    return Image.fromarray(segment.cut_cell(arr, region))


def is_image_path(path: Union[str, os.PathLike]) -> bool:
    """True when the file name has an image suffix this runtime reads."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
