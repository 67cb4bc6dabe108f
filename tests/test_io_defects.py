"""A field the tool cannot read must never pass silently: the adversarial trial's input/output defects (4-7, 11, 12,
14-17), each reproduced on real images (the committed sample fields and cells, the IML fields when present)."""
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="field segmentation needs OpenCV (the [fields] extra)")

from malaria_edge.edge_runtime import Classifier  # noqa: E402
from malaria_edge.edge_runtime.images import MAX_PIXELS, ImageError  # noqa: E402
from conftest import REPO, SAMPLES, cli  # noqa: E402

FIELDS = REPO / "edge_runtime" / "sample_fields"
SPARSE = FIELDS / "nih_field_sparse.jpg"
DENSE = FIELDS / "nih_field_dense.jpg"
IML_IMAGES = REPO.parent / "shared" / "data" / "fields" / "iml_vivax" / "images"
ONE_CELL = sorted((SAMPLES / "Parasitized").glob("*.webp"))[0]


def rows_of(path: Path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def no_traceback(done) -> bool:
    return "Traceback" not in done.stderr


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (1-bit grey) and holds no pixel data: what a decompression
    bomb or a huge scan looks like to a header read, at no cost."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def classifier():
    return Classifier.load()


# 4. a resume cuts only the tail of the file, in place

def two_fields_classified(tmp_path: Path, second: str) -> tuple:
    """A folder holding the sparse field as a.jpg and the dense one as ``second``, and its real output."""
    folder = tmp_path / "fields"
    folder.mkdir()
    shutil.copy(SPARSE, folder / "a.jpg")
    shutil.copy(DENSE, folder / second)
    out = tmp_path / "full.csv"
    cli("edge-classify", folder, "-o", out, check=True)
    return folder, out


def _cut_into_last_field(tmp_path: Path) -> tuple:
    """A real output of two fields whose second field is cut 5 rows in; (path, its bytes, offset of field 2)."""
    _, full = two_fields_classified(tmp_path, "b.jpg")
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    rows = rows_of(full)
    first = sum(1 for r in rows if r["path"].endswith("a.jpg"))
    offset = sum(len(line) for line in lines[:1 + first])
    partial = tmp_path / "partial.csv"
    partial.write_bytes(b"".join(lines[:1 + first + 5]))
    return partial, partial.read_bytes(), offset


def test_resume_truncates_only_the_last_fields_rows_in_place(tmp_path, monkeypatch):
    from malaria_edge.edge_runtime.run import drop_last_field
    partial, before, offset = _cut_into_last_field(tmp_path)
    inode = partial.stat().st_ino
    cuts = []
    real_truncate = os.truncate
    monkeypatch.setattr(os, "truncate", lambda p, n: (cuts.append(n), real_truncate(p, n))[1])
    monkeypatch.setattr(Path, "write_bytes", lambda *a: pytest.fail("the whole file was rewritten"))
    dropped = drop_last_field(partial, "csv")
    assert dropped and dropped.endswith("b.jpg")
    assert cuts == [offset]                      # one truncate, at the first byte of the last field's rows
    assert partial.stat().st_ino == inode and partial.read_bytes() == before[:offset]


def test_resume_killed_while_dropping_a_field_never_loses_the_head(tmp_path):
    """kill -9 the resume's drop step the moment the file shrinks: the rows before the last field are all there."""
    partial, before, offset = _cut_into_last_field(tmp_path)
    header, head, tail = before[:before.index(b"\n") + 1], before[:offset], before[offset:]
    big = header + head[len(header):] * 40_000                 # ~30 MB of finished rows, then the cut field
    partial.write_bytes(big + tail)
    code = ("import sys; from pathlib import Path; from malaria_edge.edge_runtime.run import drop_last_field; "
            "drop_last_field(Path(sys.argv[1]), 'csv')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(partial)])
    while proc.poll() is None and partial.stat().st_size == len(big) + len(tail):
        pass
    proc.kill()
    proc.wait()
    assert partial.read_bytes()[:len(big)] == big


# 5. a field path holding a newline is one CSV record, never split

def test_resume_keeps_every_row_of_a_field_named_with_a_newline(tmp_path):
    folder, out = two_fields_classified(tmp_path, "z\nfield\r.jpg")
    first = rows_of(out)
    assert any("\n" in r["path"] for r in first)
    for _ in range(2):
        again = cli("edge-classify", folder, "-o", out, "--resume")
        assert again.returncode == 0, again.stderr
    rows = rows_of(out)
    key = lambda r: (r["path"], r["cell"], r["x"], r["y"], r["prediction"])
    assert sorted(map(key, rows)) == sorted(map(key, first))


# 6. overlays and crops are never written where the next run reads its inputs

@pytest.mark.parametrize("option", ["--overlays", "--save-crops"])
def test_overlays_or_crops_inside_an_input_folder_are_refused(tmp_path, option):
    folder = tmp_path / "fields"
    folder.mkdir()
    shutil.copy(SPARSE, folder / "a.jpg")
    done = cli("edge-classify", folder, "-o", tmp_path / "cells.csv", option, folder / "out")
    assert done.returncode == 2 and no_traceback(done)
    assert option in done.stderr and "inside the input folder" in done.stderr
    assert not (folder / "out").exists() and not (tmp_path / "cells.csv").exists()


# 7. overlay and crop names are unique per input path, and never overwrite without --overwrite

def _same_stem_fields(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    (root / "s1").mkdir(parents=True)
    (root / "s2").mkdir()
    shutil.copy(SPARSE, root / "s1" / "field1.jpg")
    shutil.copy(DENSE, root / "s2" / "field1.jpg")
    Image.open(SPARSE).save(root / "s2" / "field1.png")
    return root


def test_overlays_and_crops_of_same_stem_fields_never_collide(tmp_path):
    root = _same_stem_fields(tmp_path)
    out = tmp_path / "cells.csv"
    cli("edge-classify", root, "-o", out, "--overlays", tmp_path / "ov", "--save-crops", tmp_path / "crops",
        check=True)
    overlays = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert overlays == ["s1__field1.jpg_overlay.png", "s2__field1.jpg_overlay.png", "s2__field1.png_overlay.png"]
    rows = rows_of(out)
    crops = sorted(p.name for p in (tmp_path / "crops").iterdir())
    assert len(crops) == len(rows)
    for row in rows:
        name = f"{Path(row['path']).parent.name}__{Path(row['path']).name}_cell{row['cell']}.png"
        assert name in crops
        assert not set('<>:"|?*') & set(name)


def test_existing_overlays_or_crops_are_refused_without_overwrite(tmp_path):
    root = _same_stem_fields(tmp_path)
    args = [root, "--overlays", tmp_path / "ov", "--save-crops", tmp_path / "crops"]
    cli("edge-classify", *args, "-o", tmp_path / "one.csv", check=True)
    overlay = tmp_path / "ov" / "s1__field1.jpg_overlay.png"
    overlay.write_bytes(b"a microscopist's own file")
    done = cli("edge-classify", *args, "-o", tmp_path / "two.csv")
    assert done.returncode == 2 and no_traceback(done) and "--overwrite" in done.stderr
    assert overlay.read_bytes() == b"a microscopist's own file" and not (tmp_path / "two.csv").exists()
    cli("edge-classify", *args, "-o", tmp_path / "two.csv", "--overwrite", check=True)
    assert overlay.read_bytes().startswith(b"\x89PNG")


# 11. an image over Pillow's own pixel limit is an error row, and the next field is still classified

def test_an_image_over_pillows_pixel_limit_is_an_error_row_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "fields"
    folder.mkdir()
    png_header(folder / "a_bomb.png", 20_000, 20_000)
    shutil.copy(SPARSE, folder / "b_field.jpg")
    out = tmp_path / "cells.csv"
    done = cli("edge-classify", folder, "-o", out)
    assert done.returncode == 1 and no_traceback(done)
    rows = rows_of(out)
    bomb = [r for r in rows if r["path"].endswith("a_bomb.png")]
    assert len(bomb) == 1 and "pixel" in bomb[0]["error"] and not bomb[0]["prediction"]
    assert sum(1 for r in rows if r["path"].endswith("b_field.jpg") and r["prediction"]) >= 10


# 12. the summary after a resume covers the whole output

def test_summary_after_resume_covers_every_field_in_the_output(tmp_path):
    out, summary = tmp_path / "cells.csv", tmp_path / "summary.json"
    cli("edge-classify", FIELDS, "-o", out, "--summary-json", summary, check=True)
    whole = json.loads(summary.read_text())
    lines = out.read_bytes().splitlines(keepends=True)
    rows = rows_of(out)
    first = sum(1 for r in rows if r["path"] == rows[0]["path"])
    out.write_bytes(b"".join(lines[:1 + first + 3]))        # one field done, the second cut short
    cli("edge-classify", FIELDS, "-o", out, "--resume", "--summary-json", summary, check=True)
    resumed = json.loads(summary.read_text())
    assert resumed["input_kinds"] == whole["input_kinds"] == {"field": 3, "cell": 0}
    assert [f["source"] for f in resumed["fields"]] == [f["source"] for f in whole["fields"]]
    assert [f["cells"] for f in resumed["fields"]] == [f["cells"] for f in whole["fields"]]
    assert resumed["model"]["cells"] == whole["model"]["cells"] == len(rows)


# 15. a folder walk never skips an image silently

def test_jfif_is_read_and_heic_is_named_as_an_input_problem(tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    Image.open(ONE_CELL).convert("RGB").save(folder / "cell.jfif", "JPEG", quality=95)
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    out = tmp_path / "cells.csv"
    done = cli("edge-classify", folder, "-o", out)
    rows = rows_of(out)
    assert [Path(r["path"]).name for r in rows if r["prediction"]] == ["cell.jfif"]
    assert done.returncode == 1 and "phone.heic" in done.stderr and "pillow-heif" in done.stderr


# 16. each refusal says what is really wrong

def test_a_small_field_read_as_a_cell_says_why_and_what_to_do(tmp_path):
    if not IML_IMAGES.is_dir():
        pytest.skip("../shared/data/fields/iml_vivax is absent")
    small = tmp_path / "small_field.jpg"
    Image.open(sorted(IML_IMAGES.glob("*.JPG"))[0]).resize((400, 300)).save(small)
    done = cli("edge-classify", small, "-o", tmp_path / "cells.csv")
    error = rows_of(tmp_path / "cells.csv")[0]["error"]
    assert done.returncode == 1 and "single cell" in error and "--input-kind field" in error


def test_a_field_over_the_pixel_limit_says_downscale_or_split(tmp_path):
    big = png_header(tmp_path / "big.png", 8_000, 6_250)      # 50 MP
    assert 8_000 * 6_250 > MAX_PIXELS
    done = cli("edge-classify", big, "-o", tmp_path / "cells.csv")
    error = rows_of(tmp_path / "cells.csv")[0]["error"]
    assert done.returncode == 1 and "pixel limit" in error and "split" in error and "crop single" not in error


def test_a_multi_page_tiff_is_refused_naming_its_pages(tmp_path):
    tiff = tmp_path / "stack.tif"
    first = Image.open(SPARSE)
    first.save(tiff, save_all=True, append_images=[Image.open(DENSE).resize(first.size)])
    done = cli("edge-classify", tiff, "-o", tmp_path / "cells.csv")
    error = rows_of(tmp_path / "cells.csv")[0]["error"]
    assert done.returncode == 1 and "2 pages" in error


def test_a_fifo_is_not_a_regular_file(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    shutil.copy(SPARSE, folder / "z.jpg")
    done = cli("edge-classify", folder, "-o", tmp_path / "cells.csv", timeout=60)
    rows = rows_of(tmp_path / "cells.csv")
    assert done.returncode == 1 and "not a regular file" in rows[0]["error"]
    assert any(r["prediction"] for r in rows if r["path"].endswith("z.jpg"))


# 17. the API refuses what it cannot read and names array fields safely

def test_classify_field_refuses_a_float_array_on_the_0_255_scale(classifier):
    rgb = np.asarray(Image.open(SPARSE).convert("RGB"))
    assert classifier.classify_field(rgb.astype(np.float32) / 255.0).n_cells >= 10    # [0, 1] floats are read
    with pytest.raises(ImageError, match="float"):
        classifier.classify_field(rgb.astype(np.float32))


def test_array_fields_get_distinct_windows_safe_names(classifier, tmp_path):
    rgb = np.asarray(Image.open(SPARSE).convert("RGB"))
    one, two = classifier.classify_field(rgb), classifier.classify_field(rgb)
    assert one.source != two.source
    first, second = one.save_crops(tmp_path), two.save_crops(tmp_path)
    names = [p.name for p in first + second]
    assert len(set(names)) == len(names) == one.n_cells + two.n_cells
    assert not any(set('<>:"|?*') & set(name) for name in names)


def test_save_plot_without_a_suffix_writes_a_png(classifier, tmp_path):
    result = classifier.classify_field(SPARSE)
    written = result.save_plot(tmp_path / "x")
    assert written.suffix == ".png" and written.read_bytes().startswith(b"\x89PNG")


# 14. the memory a field takes is what docs/bad_input.md says

def test_a_12_mp_field_stays_within_the_documented_memory(tmp_path):
    big = tmp_path / "field_12mp.jpg"
    Image.open(DENSE).convert("RGB").resize((4000, 3000), Image.BILINEAR).save(big, quality=90)
    code = ("import resource, sys; from malaria_edge.edge_runtime import Classifier; "
            "from malaria_edge.edge_runtime.fields import field_or_cell; c = Classifier.load(); "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; kind, r = field_or_cell(c, sys.argv[1]); "
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; print(kind, (after - before) * 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, check=True)
    kind, added = done.stdout.split()
    documented = 13                                          # bytes per field pixel, docs/bad_input.md
    assert f"about {documented} bytes per field pixel" in (REPO / "docs" / "bad_input.md").read_text()
    assert kind == "field" and int(added) <= 1.1 * documented * 4000 * 3000
