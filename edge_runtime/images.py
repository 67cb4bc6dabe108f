"""Image decoding and preprocessing: the one place where a cell photo becomes model input.

Training caches the output of :func:`prepare_cell` and the device calls the same function, so a cell looks the
same to the model on the laptop and on the Pi. Decoding is defensive: a field tool meets corrupt JPEGs, empty files,
16-bit TIFFs, palette PNGs and photos far too large to be a single cell.
"""
from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MalariaEdgeError

try:  # a phone's HEIC photos are read when pillow-heif is installed (it must register its opener)
    from pillow_heif import register_heif_opener
    register_heif_opener()
except ImportError:
    pass

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".gif")
# Phone formats Pillow reads only with a plugin (or a recent build): read when Pillow has an opener for them here,
# else named as an input problem with what to install, never skipped silently.
PLUGIN_SUFFIXES = {".avif": ("AVIF", "Pillow 11.3+ or pillow-avif-plugin"), ".heic": ("HEIC", "pillow-heif"),
                   ".heif": ("HEIF", "pillow-heif")}

# A segmented cell is ~100-150 px a side; a whole smear field from a phone is ~12 MP. Anything above this many
# pixels is refused before decoding (decompression bombs, or a whole slide photo passed by mistake).
MAX_PIXELS = 25_000_000

# The foreground (the cell) is everything brighter than this on the sum of channels; NIH cells sit on black.
FOREGROUND_MIN_SUM = 30

# Peak memory one image may take while it is decoded and converted, on a device with 1-2 GB. 8-bit images need at
# most ~8 bytes per pixel here (Pillow's 4-byte RGB plus one converted copy), so MAX_PIXELS keeps them under it;
# 16-bit and float images need their own bytes per pixel plus the 8-bit result and its RGB copy (converted in row
# blocks, never as one float64 copy), so their pixel limit is computed from this bound.
IMAGE_MEMORY_BOUND = 256 * 1024 * 1024
DEEP_MODE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_ROW_BLOCK_PIXELS = 1 << 20
# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose does).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}

# What a single-cell photo can look like (see check_cell_plausible). Every one of 3,000 NIH cells sampled has at
# least 33% foreground and a per-channel spread of at least 6.9 grey levels on it.
MIN_CELL_SIDE = 16
MAX_CELL_ASPECT = 4.0
NO_CELL_FOUND = "no cell found in the image (blank, all black or not a blood smear)"
MIN_FOREGROUND_FRACTION = 0.05
MIN_FOREGROUND_SPREAD = 2.0
# A crop cut tight by another tool (the cell fills it, touching every edge, no black around it) is taken whole when
# segmentation finds no cell in it. It must then look like a cell, not like a blank, glass or noise picture: on 1,500
# NIH cells cut tight (scripts/tight_crops.py) the per-channel spread is at least 5.6 grey levels and the
# neighbour-to-neighbour change at most 0.63 of the spread (squared ratio, :func:`_roughness`); noise is near 1.
MIN_TIGHT_SPREAD = 4.0
MAX_TIGHT_ROUGHNESS = 0.75

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(MalariaEdgeError, ValueError):
    """An input that cannot be turned into a cell image; the message says why in one line."""


def too_large(width: Optional[int] = None, height: Optional[int] = None) -> ImageError:
    """The one refusal for an image over the pixel limit, cell or field, with what to do about it."""
    size = f"is {width}x{height} px" if width else "is over Pillow's own decompression-bomb limit"
    return ImageError(f"image {size}, too large: over the {MAX_PIXELS:,} px pixel limit; downscale it, or split "
                      "the field into smaller images")


def _check_regular_file(path: Union[str, os.PathLike]) -> None:
    """ImageError unless ``path`` is a regular, non-empty file: a FIFO, a device or a socket would block or be
    read forever, and is never an image file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("not a regular file (a pipe, device or socket); give the image file itself")
    if info.st_size == 0:
        raise ImageError("empty file (0 bytes)")


def _unreadable(path: Union[str, os.PathLike]) -> ImageError:
    """The refusal for a file Pillow cannot identify: which plugin its format needs, when we know."""
    return ImageError(plugin_hint(path) or "not an image Pillow can read (wrong or unknown format)")


def plugin_hint(path: Union[str, os.PathLike]) -> Optional[str]:
    """For a phone format Pillow cannot read here (no plugin), what to install; else None."""
    suffix = Path(path).suffix.lower()
    if suffix not in PLUGIN_SUFFIXES or suffix in Image.registered_extensions():
        return None
    name, plugin = PLUGIN_SUFFIXES[suffix]
    return f"{name} needs {plugin} (pip install it), or convert the image to JPEG or PNG"


def max_pixels_for(mode: str) -> int:
    """The largest image of this Pillow mode that decodes within :data:`IMAGE_MEMORY_BOUND`."""
    depth = DEEP_MODE_BYTES.get(mode)
    return MAX_PIXELS if depth is None else min(MAX_PIXELS, IMAGE_MEMORY_BOUND // (depth + 1 + 4))


def open_image(path: Union[str, os.PathLike], draft_to: Optional[int] = None) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB, raising :class:`ImageError` with a one-line reason.

    ``draft_to``: a JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 scale (never below ``draft_to`` px a
    side) by the JPEG decoder itself, so a phone photo passed as a cell costs a fraction of its full memory."""
    path = Path(path)
    _check_regular_file(path)
    try:
        plain_webp = _decode_plain_webp(path)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if plain_webp is not None:
        return plain_webp
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise too_large(width, height)
                _check_single_page(img)
                limit = max_pixels_for(img.mode)
                if width * height > limit:
                    raise ImageError(
                        f"{img.mode} image is {width}x{height} px, too large to convert within "
                        f"{IMAGE_MEMORY_BOUND // 2**20} MB (limit {limit:,} px for this bit depth); downscale it "
                        "or split it")
                if draft_to and img.format == "JPEG":
                    img.draft("RGB", (draft_to, draft_to))
                img.load()
                if img.mode in DEEP_MODE_BYTES:  # convert, then free the deep pixels before the RGB copy
                    orientation = img.getexif().get(0x0112, 1)
                    gray = _deep_to_gray(img)
                    img.close()
                    if orientation in _ORIENTATION:
                        gray = gray.transpose(_ORIENTATION[orientation])
                    return to_rgb(gray)
                return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large() from None
    except UnidentifiedImageError:
        raise _unreadable(path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})") from None


def _check_single_page(img: Image.Image) -> None:
    """A multi-page TIFF (a z-stack, several fields in one file) is refused: reading its first page alone would
    pass the others silently."""
    pages = getattr(img, "n_frames", 1) if img.format == "TIFF" else 1
    if pages > 1:
        raise ImageError(f"multi-page TIFF ({pages} pages): only single images are read; save each page as its own "
                         "file (one field or cell per file)")


def _decode_plain_webp(path: Path) -> Optional[Image.Image]:
    """:func:`plain_webp_pixels` as a Pillow image."""
    rgb = plain_webp_pixels(path)
    return None if rgb is None else Image.fromarray(rgb)


def plain_webp_pixels(path: Union[str, os.PathLike]) -> Optional[np.ndarray]:
    """A simple-format WebP (one lossy or lossless bitstream, no alpha; such a file has no room for EXIF or
    animation) decoded by OpenCV's libwebp from one read of the file, as an upright HxWx3 uint8 RGB array, without
    setting up Pillow's animation decoder: the same pixels (checked on every NIH cell), a little less time. None,
    so that Pillow decodes it, for any other file, a size over MAX_PIXELS, or without OpenCV (the base install);
    OSError when the file cannot be read."""
    from .segment import cv2
    if cv2 is None:
        return None
    with open(path, "rb") as handle:
        head = handle.read(30)
        size = plain_webp_size(head)
        if size is None or size[0] * size[1] > MAX_PIXELS:
            return None
        data = np.frombuffer(head + handle.read(), np.uint8)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV 4.10+: libwebp writes RGB, no channel swap after
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED if rgb_flag is None else rgb_flag)
    if pixels is None or pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[1::-1] != size:
        return None
    return pixels if rgb_flag is not None else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def plain_webp_size(head: bytes) -> Optional[tuple]:
    """(width, height) from the first 30 bytes of a simple-format WebP without alpha (RIFF, then one ``VP8 ``
    or ``VP8L`` chunk), else None (extended ``VP8X`` files may carry alpha, EXIF or frames)."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    if head[12:16] == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")  # 14 bits width-1, 14 bits height-1, alpha, version
        if bits >> 28 & 1 or bits >> 29:
            return None
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if head[12:16] == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def open_image_size(path: Union[str, os.PathLike]) -> tuple:
    """(width, height) read from the file header only; :class:`ImageError` with a one-line reason when the file
    is missing, empty, not a regular file, not an image or over Pillow's own pixel limit. A simple WebP's 30-byte header is read directly (Pillow's WebP opener
    reads the whole file and sets up its decoder)."""
    _check_regular_file(path)
    try:
        with open(path, "rb") as handle:
            size = plain_webp_size(handle.read(30))
        if size is not None:
            return size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked where decoded
            with Image.open(path) as img:
                return img.size
    except Image.DecompressionBombError:
        raise too_large() from None
    except OSError as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise _unreadable(path) from None
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha is composited on black (the NIH background), 16-bit and float
    images are scaled from their own range, palette and grayscale images are expanded. An upright RGB image is
    returned as it is (no second copy of a large photo); callers never modify it."""
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in DEEP_MODE_BYTES:
        img = _deep_to_gray(img)
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


def _deep_to_gray(img: Image.Image) -> Image.Image:
    """16-bit or float image -> 8-bit grayscale stretched over its own range, one block of rows at a time, so the
    peak is the decoded image plus the 8-bit result (never a float64 copy of the whole picture)."""
    width, height = img.size
    rows = max(1, _ROW_BLOCK_PIXELS // max(1, width))

    def blocks():
        for top in range(0, height, rows):
            block = np.asarray(img.crop((0, top, width, min(height, top + rows))), dtype=np.float32)
            yield top, block

    lo, hi = np.inf, -np.inf
    for _, block in blocks():
        finite = block[np.isfinite(block)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    out = np.zeros((height, width), np.uint8)
    if np.isfinite(lo) and hi > lo:
        scale = np.float32(255.0 / (hi - lo))
        for top, block in blocks():
            block = np.nan_to_num(block, nan=lo, posinf=hi, neginf=lo)
            block -= np.float32(lo)
            block *= scale
            block += np.float32(0.5)
            np.clip(block, 0, 255, out=block)
            out[top:top + len(block)] = block
    return Image.frombuffer("L", (width, height), out, "raw", "L", 0, 1)


def check_cell_plausible(img: Image.Image) -> None:
    """Raise :class:`ImageError` when a single-cell input cannot be a cell photo: smaller than 16 px a side, more
    than 4:1 elongated, (nearly) all black, or one uniform colour. The model would otherwise give such an image a
    confident call; a clinician needs "this is not a cell" instead."""
    width, height = img.size
    _check_cell_shape(width, height)
    small = img
    if max(width, height) > 256:
        factor = max(width, height) / 256
        small = img.resize((max(1, round(width / factor)), max(1, round(height / factor))), Image.BOX)
    pixels = np.asarray(small if small.mode == "RGB" else small.convert("RGB"), dtype=np.uint8).reshape(-1, 3)
    _check_cell_pixels(pixels, channel_sum(pixels) > FOREGROUND_MIN_SUM)


def _check_cell_shape(width: int, height: int) -> None:
    """The size and aspect half of :func:`check_cell_plausible`."""
    if min(width, height) < MIN_CELL_SIDE:
        raise ImageError(f"image is {width}x{height} px, too small to be a cell photo (at least {MIN_CELL_SIDE} px "
                         "a side)")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_CELL_ASPECT:
        raise ImageError(f"image is {width}x{height} px, aspect ratio {aspect:.1f}:1: not a single cell (at most "
                         f"{MAX_CELL_ASPECT:g}:1)")


def _check_cell_pixels(pixels: np.ndarray, foreground: np.ndarray) -> None:
    """The pixel half of :func:`check_cell_plausible`: uint8 ``pixels`` [N, 3] and their ``foreground`` [N]
    (bool, or uint8 0/1) -> ImageError when (nearly) all black or one uniform colour."""
    share = np.count_nonzero(foreground) / len(foreground)
    if share < MIN_FOREGROUND_FRACTION:
        raise ImageError(f"no cell visible: the image is (nearly) all black ({share:.1%} foreground)")
    if float(masked_std(pixels, foreground).max()) < MIN_FOREGROUND_SPREAD:
        raise ImageError("the image is one uniform colour: no cell visible")


def _check_cell_array(rgb: np.ndarray, nonblack: np.ndarray) -> None:
    """:func:`_check_cell_pixels` on an HxWx3 uint8 crop and its uint8 non-black mask (OpenCV installed), with the
    same decisions in a third of the time: a channel's spread over the cell is at least sqrt(m / n) times its
    spread over any m of its n pixels (the sample's own mean minimises the sample's squared deviations), so a
    spread well above the limit on every fourth row settles it; only a crop that fails that bound is measured
    whole."""
    from .segment import cv2
    count = cv2.countNonZero(nonblack)
    share = count / nonblack.size
    if share < MIN_FOREGROUND_FRACTION:
        raise ImageError(f"no cell visible: the image is (nearly) all black ({share:.1%} foreground)")
    sample = nonblack[::4]
    sampled = cv2.countNonZero(sample)
    if sampled:
        _, std = cv2.meanStdDev(rgb[::4], mask=sample)
        if sampled / count * float(std.max()) ** 2 >= MIN_FOREGROUND_SPREAD ** 2 * (1 + 1e-9):
            return
    _check_cell_pixels(rgb.reshape(-1, 3), nonblack.reshape(-1))


def channel_sum(pixels: np.ndarray) -> np.ndarray:
    """R + G + B of uint8 pixels [..., 3] as uint16: three plane adds, several times faster than ``sum(axis=-1)``
    over a length-3 axis."""
    total = pixels[..., 0].astype(np.uint16)
    total += pixels[..., 1]
    total += pixels[..., 2]
    return total


def masked_std(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation (numpy's ``std``) of the uint8 rows of ``pixels`` [N, C] where ``mask`` [N]
    is True, without copying the selected pixels: OpenCV's masked statistics when it is installed, else two
    float64 matrix-vector products."""
    from .segment import cv2
    if cv2 is not None and pixels.shape[1] <= 4:
        on = (mask if mask.dtype == np.uint8 else np.asarray(mask, bool).view(np.uint8))[:, None]
        _, std = cv2.meanStdDev(np.ascontiguousarray(pixels)[:, None, :], mask=on)
        return std.ravel()
    weights = mask.astype(np.float64)
    values = pixels.astype(np.float64)
    count = max(1.0, float(weights.sum()))
    mean = weights @ values / count
    values -= mean
    values *= values
    return np.sqrt(weights @ values / count)


def array_to_image(arr: np.ndarray) -> Image.Image:
    """Accept HxW, HxWx1, HxWx3 or HxWx4 arrays (uint8, uint16 or float in [0, 1]) as an RGB image. A float array
    with values outside [0, 1] (0-255 floats from an OpenCV or numpy conversion) is refused: read as [0, 1] it
    would be all white and show no cell, with no error."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise ImageError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        _check_unit_floats(arr)
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(arr))


def _check_unit_floats(arr: np.ndarray) -> None:
    """ImageError when a float image's finite values are not all within [0, 1]."""
    finite = arr[np.isfinite(arr)]
    if finite.size and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
        raise ImageError(f"{arr.dtype} array with values from {float(finite.min()):g} to {float(finite.max()):g}: "
                         "float images must be in [0, 1]; divide 0-255 values by 255, or pass a uint8 array")


def load_image(source: ImageInput, draft_to: Optional[int] = None) -> Image.Image:
    """Return an RGB Pillow image from a path, a Pillow image or an array (``draft_to``: see :func:`open_image`)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    return open_image(source, draft_to)


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
    # A large JPEG is decoded at reduced scale; with room for the central cell to be half the crop's width.
    img = load_image(source, 2 * size if central else size)
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
        if not segment.is_on_black(arr):
            raise ImageError(segment.OPENCV_HINT)
        if np.mean(arr.astype(np.int32).sum(axis=2) > 30) < 0.05:
            raise ImageError(NO_CELL_FOUND)
        return img
    nonblack = segment.nonblack_mask(np.ascontiguousarray(arr))
    region = segment.central_cell(arr, nonblack)
    if region is None:
        _check_tight_crop(arr, nonblack)
        return img
    return Image.fromarray(segment.cut_cell(arr, region))


def _check_tight_crop(rgb: np.ndarray, nonblack: np.ndarray) -> None:
    """Where segmentation found no cell: pass a crop cut tight around its cell (not on black, a cell filling it,
    touching every edge), which is then the cell as it is; raise ``NO_CELL_FOUND`` for anything else (a blank,
    uniform or glass-only picture, noise)."""
    from . import segment
    if segment.is_on_black(rgb, nonblack) or np.count_nonzero(nonblack) < 0.5 * nonblack.size:
        raise ImageError(NO_CELL_FOUND)
    pixels = rgb.reshape(-1, 3)
    if float(masked_std(pixels, nonblack.reshape(-1)).max()) < MIN_TIGHT_SPREAD:
        raise ImageError(NO_CELL_FOUND)
    if _roughness(rgb) > MAX_TIGHT_ROUGHNESS:
        raise ImageError(NO_CELL_FOUND)


def _roughness(rgb: np.ndarray) -> float:
    """How much of a picture's variance is pixel-to-pixel change: the variance of the differences between
    neighbours over twice the variance of the pixels (summed over channels), about 1 for noise, a few hundredths
    for a cell (smooth inside, one edge around it)."""
    pixels = rgb.astype(np.float32)
    spread = float(pixels.reshape(-1, 3).var(axis=0).sum())
    if spread == 0:
        return 1.0
    across = float(np.diff(pixels, axis=1).reshape(-1, 3).var(axis=0).sum())
    down = float(np.diff(pixels, axis=0).reshape(-1, 3).var(axis=0).sum())
    return (across + down) / (4 * spread)


def prepare_single_cell(image: Union[np.ndarray, Image.Image], size: int, stain: dict | None = None) -> np.ndarray:
    """A decoded single-cell image (an upright Pillow image, or an array as :func:`array_to_image` takes it;
    ``Classifier.decode`` gives an RGB image or an HxWx3 uint8 array) as model input: what
    :func:`check_cell_plausible` then :func:`prepare_cell` do on it, with the same errors and the same pixels. The
    cell path runs this once per image, so a crop of at most 256 px a side (every NIH cell) is checked and cut as
    an array, with one non-black mask shared by the check, the on-black test and the cut (Pillow only resizes);
    larger images, or any without OpenCV, go through those two functions."""
    from . import segment
    if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8):
        image = array_to_image(image)
    elif isinstance(image, Image.Image) and image.mode != "RGB":
        image = to_rgb(image)
    is_array = isinstance(image, np.ndarray)
    width, height = (image.shape[1], image.shape[0]) if is_array else image.size
    if segment.cv2 is None or max(width, height) > 256:
        img = Image.fromarray(image) if is_array else image
        check_cell_plausible(img)
        return prepare_cell(img, size, stain)
    _check_cell_shape(width, height)
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    nonblack = segment.nonblack_mask(rgb)
    _check_cell_array(rgb, nonblack)
    region = segment.central_cell(rgb, nonblack)
    if region is None:
        _check_tight_crop(rgb, nonblack)
        cut = rgb
    else:
        cut = segment.cut_cell(rgb, region)
    if cut.shape[:2] != (size, size):
        resized = Image.frombytes("RGB", cut.shape[1::-1], cut).resize((size, size), Image.BILINEAR)
        cut = np.frombuffer(resized.tobytes(), np.uint8).reshape(size, size, 3)
    if stain:
        cut = normalize_stain(cut, stain["mean"], stain["std"])
    return cut


# Characters no Windows file name may hold (and path separators): replaced in names this tool makes up.
_UNSAFE_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')


def safe_file_name(text: str) -> str:
    """``text`` usable as one file name on Linux, macOS and Windows (a phone's or a Pi's card is often FAT): path
    separators, ``<>:"|?*`` and control characters become ``_``; a trailing dot or space (Windows drops them) too."""
    name = _UNSAFE_NAME.sub("_", text)
    return re.sub(r"[. ]+$", lambda m: "_" * len(m.group()), name) or "_"


def is_image_path(path: Union[str, os.PathLike]) -> bool:
    """True when the file name has an image suffix this runtime reads (AVIF/HEIC only with Pillow's opener for
    them installed: see :func:`plugin_hint` for the others)."""
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_SUFFIXES or (suffix in PLUGIN_SUFFIXES and suffix in Image.registered_extensions())
