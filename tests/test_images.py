"""Decoding any image a field phone may produce, and refusing what is not a cell photo."""
import numpy as np
import pytest
from PIL import Image

from malaria_edge.edge_runtime.images import MAX_PIXELS, ImageError, normalize_stain, open_image, prepare_cell
from conftest import SAMPLES

CELL = next((SAMPLES / "Parasitized").glob("*.webp"))


@pytest.fixture()
def cell_rgb():
    return Image.open(CELL).convert("RGB")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb_uint8(tmp_path, cell_rgb, mode):
    if mode == "I;16":
        img = Image.fromarray((np.asarray(cell_rgb.convert("L"), np.uint16) * 257))
    elif mode in ("I", "F"):
        img = cell_rgb.convert("L").convert(mode)
    else:
        img = cell_rgb.convert(mode)
    suffix = ".tiff" if mode in ("I;16", "I", "F", "CMYK", "YCbCr") else ".png"
    if mode == "YCbCr":
        suffix = ".jpg"
    path = tmp_path / f"cell{suffix}"
    img.save(path)
    out = prepare_cell(path, 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    assert out.max() > 0


def test_sixteen_bit_uses_its_range(tmp_path, cell_rgb):
    gray = np.asarray(cell_rgb.convert("L"), np.uint16) * 257
    path = tmp_path / "cell16.png"
    Image.fromarray(gray).save(path)
    out = np.asarray(open_image(path))
    assert out.max() == 255 and out.min() == 0


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[10:30, 10:30, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = np.asarray(open_image(path))
    assert out[0, 0].tolist() == [0, 0, 0] and out[20, 20].tolist() == [200, 0, 0]


def test_arrays_and_pil_images_match_the_file(cell_rgb):
    from_file = prepare_cell(CELL, 48)
    assert np.array_equal(prepare_cell(cell_rgb, 48), from_file)
    assert np.array_equal(prepare_cell(np.asarray(cell_rgb), 48), from_file)
    assert prepare_cell(np.asarray(cell_rgb, np.float32) / 255.0, 48).shape == (48, 48, 3)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"this is a text file, not a picture", "not an image"),
    (None, "corrupt or truncated"),
])
def test_bad_files_raise_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is None:
        Image.open(CELL).convert("RGB").resize((200, 200)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        prepare_cell(path, 48)
    assert "\n" not in str(err.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path, optimize=True)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="too large"):
        open_image(path)


def test_missing_file_and_bad_arrays():
    with pytest.raises(ImageError, match="cannot read"):
        open_image("/nonexistent/cell.png")
    with pytest.raises(ImageError, match="not an image"):
        prepare_cell(np.zeros((4, 4, 7), np.uint8), 32)


def test_stain_normalisation_matches_the_targets_and_keeps_background_black():
    arr = prepare_cell(CELL, 64)
    target = {"mean": [180.0, 141.0, 151.0], "std": [33.0, 27.0, 27.0]}
    out = normalize_stain(arr, target["mean"], target["std"])
    foreground = arr.astype(int).sum(axis=2) > 30
    assert np.allclose(out[foreground].mean(axis=0), target["mean"], atol=4)
    assert (out[~foreground] == 0).all()


def test_a_large_jpeg_cell_is_decoded_at_reduced_scale_and_looks_the_same(samples, tmp_path):
    """Decoding only what the resize keeps: a 512 px JPEG bound for 48 px is decoded at 1/4 or 1/8 scale, and
    the model input differs from a full decode by less than a few grey levels."""
    cell = Image.open(next(iter(sorted((samples / "Parasitized").iterdir())))).convert("RGB")
    path = tmp_path / "big.jpg"
    cell.resize((512, 512), Image.BICUBIC).save(path, quality=95)
    assert max(open_image(path, 48).size) < 512
    with Image.open(path) as full:
        full.load()
        reference = prepare_cell(full.convert("RGB"), 48, central=False).astype(int)
    fast = prepare_cell(path, 48, central=False).astype(int)
    assert np.abs(fast - reference).mean() < 3.0


@pytest.mark.parametrize("lossless", [True, False])
def test_a_plain_webp_gives_pillows_pixels_with_or_without_opencv(tmp_path, cell_rgb, monkeypatch, lossless):
    """The OpenCV fast path for simple WebP files (all NIH cells) decodes the very pixels Pillow decodes, and the
    header size it reads is Pillow's."""
    from malaria_edge.edge_runtime import segment
    from malaria_edge.edge_runtime.images import plain_webp_size
    path = tmp_path / "cell.webp"
    cell_rgb.resize((100, 90)).save(path, lossless=lossless, quality=80)
    with Image.open(path) as img:
        img.load()
        pillow = np.asarray(img.convert("RGB"))
    assert plain_webp_size(path.read_bytes()[:30]) == (100, 90)
    assert np.array_equal(np.asarray(open_image(path)), pillow)
    monkeypatch.setattr(segment, "cv2", None)
    assert np.array_equal(np.asarray(open_image(path)), pillow)


def test_a_webp_with_alpha_or_exif_rotation_is_still_composited_and_turned(tmp_path, cell_rgb):
    """WebP files the fast path leaves to Pillow: alpha goes on black, EXIF orientation is applied."""
    from malaria_edge.edge_runtime.images import plain_webp_size
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[10:30, 10:30, 3] = 255
    alpha = tmp_path / "alpha.webp"
    Image.fromarray(rgba, "RGBA").save(alpha, lossless=True)
    out = np.asarray(open_image(alpha))
    assert out[0, 0].tolist() == [0, 0, 0] and out[20, 20].tolist() == [200, 0, 0]
    rotated = tmp_path / "rotated.webp"
    exif = Image.Exif()
    exif[0x0112] = 6
    cell_rgb.resize((100, 60)).save(rotated, exif=exif.tobytes(), lossless=True)
    assert plain_webp_size(rotated.read_bytes()[:30]) is None
    assert open_image(rotated).size == (60, 100)
