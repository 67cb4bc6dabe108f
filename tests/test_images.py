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


def _pillow_path(image, size=48):
    """What the single-cell path did before its array fast path: the Pillow check, then prepare_cell."""
    from malaria_edge.edge_runtime.images import check_cell_plausible
    check_cell_plausible(image)
    return prepare_cell(image, size)


def _outcome(fn, image):
    try:
        return fn(image).tobytes()
    except ImageError as exc:
        return str(exc)


def test_the_array_fast_path_gives_the_pillow_paths_pixels_and_errors(samples):
    """prepare_single_cell (decoded array in, one shared non-black mask) against the Pillow check and
    prepare_cell: the same model input for every bundled sample, the same refusal for what is not a cell."""
    pytest.importorskip("cv2")
    from malaria_edge.edge_runtime.images import prepare_single_cell
    cells = [Image.open(p).convert("RGB") for p in sorted(samples.rglob("*.webp"))]
    rng = np.random.default_rng(0)
    glass = np.full((90, 100, 3), 215, np.uint8)
    glass[20:70, 25:75] = np.asarray(cells[0].resize((50, 50)))
    not_cells = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 120, np.uint8),
                 np.zeros((10, 64, 3), np.uint8), np.full((20, 90, 3), 200, np.uint8),
                 rng.integers(0, 255, (100, 100, 3), dtype=np.uint8), glass]
    for image in cells + [Image.fromarray(a) for a in not_cells]:
        expected = _outcome(_pillow_path, image)
        assert _outcome(lambda im: prepare_single_cell(im, 48), image) == expected
        assert _outcome(lambda im: prepare_single_cell(np.asarray(im), 48), image) == expected


@pytest.mark.parametrize("spread", [0.0, 1.0, 1.9, 1.99, 2.01, 2.1, 3.0, 4.5, 8.0])
def test_the_fast_uniform_colour_check_decides_as_the_whole_crop_does(spread):
    """The sampled-rows shortcut of the is-it-a-cell check never changes its decision: crops whose colour
    spread lies just below, at and above the 2-grey-level limit are refused or passed as the full measure says."""
    pytest.importorskip("cv2")
    from malaria_edge.edge_runtime.images import check_cell_plausible, prepare_single_cell
    rng = np.random.default_rng(int(spread * 100))
    for trial in range(20):
        crop = np.zeros((80, 80, 3), np.uint8)
        values = np.clip(np.round(150 + rng.normal(0, spread, (60, 60, 3))), 0, 255).astype(np.uint8)
        if trial % 2:  # spread concentrated in a few rows, so the sampled rows see less of it
            values[:] = 150
            values[rng.integers(0, 60, 3)] = np.clip(150 + rng.normal(0, 4 * spread, (3, 60, 3)), 0, 255)
        crop[10:70, 10:70] = values
        image = Image.fromarray(crop)
        try:
            check_cell_plausible(image)
            expected = None
        except ImageError as exc:
            expected = str(exc)
        try:
            prepare_single_cell(crop, 48)
            got = None
        except ImageError as exc:
            got = str(exc)
        assert got == expected or (expected is None and got and "no cell found" in got)
