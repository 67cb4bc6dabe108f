"""edge-prepare: patient ids, the patient-level split, the manifest, bad files, zip input, offline download."""
import csv
import hashlib
import shutil
import zipfile
from collections import defaultdict

import pytest

from malaria_edge.edge_runtime.labels import patient_id
from conftest import SAMPLES, cli
from malaria_edge.train.dataset import (DatasetError, download_zip, manifest_hash, prepare, read_manifest, split_patients,
                           scan)


def test_patient_id_from_nih_names():
    assert patient_id("C100P61ThinF_IMG_20150918_144104_cell_162.png") == "100"
    assert patient_id("/x/Uninfected/C7NthinF_IMG_20150611_104404_cell_199.webp") == "7"
    assert patient_id("C1_thinF_IMG_20150604_104722_cell_9.png") == "1"
    assert patient_id("cell.png") is None


def _patients_by_split(cells):
    seen = defaultdict(set)
    for c in cells:
        seen[c.patient].add(c.split)
    return seen


def test_samples_split_keeps_each_patient_on_one_side(sample_manifest):
    cells = read_manifest(sample_manifest)
    assert len(cells) == len(list(SAMPLES.rglob("*.webp")))
    assert all(len(splits) == 1 for splits in _patients_by_split(cells).values())
    assert {c.split for c in cells} == {"train", "val", "test"}


def test_nih_copy_split_is_patient_level_stratified_and_reproducible(shared_data, tmp_path):
    report = prepare(shared_data, tmp_path, seed=42, log=lambda m: None)
    cells = read_manifest(tmp_path / "manifest.csv")
    assert len(cells) == 18873
    assert all(len(splits) == 1 for splits in _patients_by_split(cells).values())
    counts = report["counts"]
    assert counts["test"]["patients"] == 28 and counts["val"]["patients"] == 11 and counts["train"]["patients"] == 101
    # stratified: infected and healthy patients in test in the proportion of the whole set (105:35)
    assert counts["test"]["infected_patients"] == 21 and counts["test"]["healthy_patients"] == 7
    again = split_patients(cells, seed=42)
    assert all(again[c.patient] == c.split for c in cells)
    other = split_patients(cells, seed=7)
    assert any(other[c.patient] != c.split for c in cells)


def test_manifest_hash_does_not_depend_on_location(tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(SAMPLES, copy)
    a = prepare(SAMPLES, tmp_path / "a", log=lambda m: None)
    b = prepare(copy, tmp_path / "b", log=lambda m: None)
    assert a["manifest_sha256"] == b["manifest_sha256"]
    assert a["manifest_sha256"] == manifest_hash(read_manifest(tmp_path / "a" / "manifest.csv"))


def test_bad_files_are_listed_and_left_out(tmp_path):
    data = tmp_path / "cell_images"
    shutil.copytree(SAMPLES, data)
    (data / "Parasitized" / "C1P1ThinF_broken_cell_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "Uninfected" / "C2P2ThinF_empty_cell_1.png").write_bytes(b"")
    (data / "Uninfected" / "Thumbs.db").write_bytes(b"windows thumbnail cache")
    (data / "Uninfected" / "notes.txt").write_text("not an image")
    done = cli("edge-prepare", "--data", data, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    reasons = {r["path"].split("/")[-1]: r["reason"] for r in
               __import__("json").loads((tmp_path / "out" / "prepare.json").read_text())["bad_files"]}
    assert "C1P1ThinF_broken_cell_1.png" in reasons and "C2P2ThinF_empty_cell_1.png" in reasons
    assert "notes.txt" in reasons and "Thumbs.db" not in reasons
    assert "skipped" in done.stderr and "patients" in done.stdout
    with open(tmp_path / "out" / "manifest.csv") as fh:
        names = [row["path"] for row in csv.DictReader(fh)]
    assert not any("broken" in n or "empty" in n for n in names)


def test_prepare_reads_the_official_zip_layout(tmp_path):
    archive = tmp_path / "cell_images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in SAMPLES.rglob("*.webp"):
            zf.write(f, f"cell_images/{f.parent.name}/{f.name}")
    report = prepare(archive, tmp_path / "out", log=lambda m: None)
    assert sum(c["cells"] for c in report["counts"].values()) == len(list(SAMPLES.rglob("*.webp")))


def test_not_a_dataset_fails_with_one_line(tmp_path):
    done = cli("edge-prepare", "--data", tmp_path, "--out", tmp_path / "out")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Parasitized" in done.stderr


def test_download_offline_fails_with_a_clear_line(tmp_path):
    with pytest.raises(DatasetError, match="offline"):
        download_zip(tmp_path / "cell_images.zip", url="http://127.0.0.1:9/cell_images.zip", timeout=5)


def test_scan_finds_every_sample():
    cells, bad = scan(SAMPLES)
    assert not bad and {c.label for c in cells} == {"parasitized", "uninfected"}


def _zip_of_samples(path, extra=()):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(SAMPLES.rglob("*.webp")):
            zf.write(f, f"cell_images/{f.parent.name}/{f.name}")
        for name, data in extra:
            zf.writestr(name, data)
    return path


def test_a_zip_bomb_is_refused_before_it_fills_the_disk(tmp_path):
    bomb = _zip_of_samples(tmp_path / "bomb.zip", [("cell_images/Uninfected/C1P1ThinF_zeros.png", b"\0" * 10_000_000)])
    assert bomb.stat().st_size < 1_000_000
    done = cli("edge-prepare", "--data", bomb, "--out", tmp_path / "out")
    assert done.returncode == 1 and "compress" in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else True


def test_zip_size_limits_are_enforced(tmp_path):
    from malaria_edge.train.dataset import extract_zip
    archive = _zip_of_samples(tmp_path / "cells.zip")
    with pytest.raises(DatasetError, match="member"):
        extract_zip(archive, tmp_path / "a", max_member_bytes=1000)
    with pytest.raises(DatasetError, match="in all"):
        extract_zip(archive, tmp_path / "b", max_total_bytes=50_000)


def test_another_zip_into_the_same_out_replaces_the_old_cells(tmp_path):
    big = _zip_of_samples(tmp_path / "big.zip")
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(small, "w") as zf:
        for f in sorted(SAMPLES.rglob("*.webp"))[::4]:
            zf.write(f, f"cell_images/{f.parent.name}/{f.name}")
    first = prepare(big, tmp_path / "out", log=lambda m: None)
    second = prepare(small, tmp_path / "out", log=lambda m: None)
    n_small = len(sorted(SAMPLES.rglob("*.webp"))[::4])
    assert sum(c["cells"] for c in second["counts"].values()) == n_small
    assert sum(c["cells"] for c in first["counts"].values()) == len(list(SAMPLES.rglob("*.webp")))
    # the marker holds the zip's SHA-256, not its size, so a same-size different zip is re-extracted too
    marker = tmp_path / "out" / "cell_images" / ".extracted"
    assert marker.read_text().strip() == hashlib.sha256(small.read_bytes()).hexdigest()


def test_an_unrelated_folder_is_never_replaced_by_extraction(tmp_path):
    archive = _zip_of_samples(tmp_path / "cells.zip")
    mine = tmp_path / "out" / "cell_images"
    mine.mkdir(parents=True)
    (mine / "my_notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not extracted by edge-prepare"):
        prepare(archive, tmp_path / "out", log=lambda m: None)
    assert (mine / "my_notes.txt").read_text() == "keep me"
