"""edge-classify and edge-bench against a hostile or careless user: nothing lost, nothing mixed (issue 11).

Each test is named after the behaviour a clinician relies on and reproduces one defect of the adversarial trial."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_edge.edge_runtime.images import IMAGE_MEMORY_BOUND, ImageError, check_cell_plausible
from malaria_edge.edge_runtime.labels import patient_id
from malaria_edge.edge_runtime.results_io import OutputLock, expand_inputs
from conftest import BIN, SAMPLES, cli

N_SAMPLES = len(list(SAMPLES.rglob("*.webp")))
ONE_CELL = sorted((SAMPLES / "Parasitized").glob("*.webp"))[0]


def rows_of(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def one_line(stderr: str) -> bool:
    """Our message is one line (the interpreter library's own INFO line at model load is not ours)."""
    ours = [line for line in stderr.strip().splitlines() if not line.startswith("INFO: ")]
    return len(ours) == 1 and "Traceback" not in stderr


# 1. --resume only onto a file that is recognisably ours

def test_resume_refuses_an_image_and_touches_nothing(bundled_model, tmp_path):
    victim = tmp_path / "v.webp"
    shutil.copy(ONE_CELL, victim)
    before = victim.read_bytes()
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", victim, "--resume")
    assert done.returncode == 2 and one_line(done.stderr) and "not an edge-classify" in done.stderr
    assert victim.read_bytes() == before


def test_resume_refuses_a_text_file_and_keeps_its_last_line(bundled_model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("patient list\nlast line without newline")
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", notes, "--resume")
    assert done.returncode == 2 and one_line(done.stderr)
    assert notes.read_text() == "patient list\nlast line without newline"


def test_resume_onto_an_output_of_the_earlier_columns_says_so_and_touches_nothing(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    _first_run(bundled_model, out)
    rows = list(csv.reader(out.open(newline="")))
    edge = rows[0].index("at_edge")
    with out.open("w", newline="") as fh:     # as the version before the at_edge column wrote it
        csv.writer(fh).writerows([r[:edge] + r[edge + 1:] for r in rows])
    before = out.read_bytes()
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, "--resume")
    assert done.returncode == 2 and one_line(done.stderr) and "earlier malaria-edge" in done.stderr
    assert out.read_bytes() == before


# 2. --summary-json and --groups-output follow --output's rule

def test_summary_json_does_not_overwrite_an_existing_file(bundled_model, tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text("precious")
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "--summary-json", summary)
    assert done.returncode == 2 and one_line(done.stderr) and "--overwrite" in done.stderr
    assert summary.read_text() == "precious"


def test_summary_json_cannot_be_the_rows_file_or_an_input(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, "--summary-json", out, "--overwrite")
    assert done.returncode == 2 and one_line(done.stderr) and "same file" in done.stderr
    assert not out.exists()
    image = tmp_path / "cell.webp"
    shutil.copy(ONE_CELL, image)
    before = image.read_bytes()
    done = cli("edge-classify", image, "--model", bundled_model, "--group-by", "folder", "--groups-output", image,
               "--overwrite")
    assert done.returncode == 2 and "input" in done.stderr and image.read_bytes() == before


# 3. resume never mixes runs

def _first_run(bundled_model, out, *extra):
    cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, *extra, check=True)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:6]))  # interrupted after 5 rows
    return out.read_bytes()


def test_resume_refuses_another_threshold_naming_it(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    before = _first_run(bundled_model, out, "--threshold", "0.5")
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, "--resume", "--threshold", "0.3")
    assert done.returncode == 2 and one_line(done.stderr) and "threshold" in done.stderr
    assert out.read_bytes() == before


def test_resume_refuses_another_model_and_another_format(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    before = _first_run(bundled_model, out)
    fp32 = bundled_model.with_name(bundled_model.name.replace("int8", "fp32"))
    done = cli("edge-classify", SAMPLES, "--model", fp32, "-o", out, "--resume")
    assert done.returncode == 2 and "model" in done.stderr and out.read_bytes() == before
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, "--resume", "--format", "jsonl")
    assert done.returncode == 2 and "format" in done.stderr and out.read_bytes() == before


def test_resume_refuses_compare_onto_rows_written_without_it(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    before = _first_run(bundled_model, out)
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, "--resume", "--compare")
    assert done.returncode == 2 and one_line(done.stderr) and "compare" in done.stderr
    assert out.read_bytes() == before


def test_resume_knows_a_folder_given_as_an_absolute_path(bundled_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(SAMPLES, work / "cells")
    out = work / "rows.csv"
    cli("edge-classify", "cells", "--model", bundled_model, "-o", out, check=True, cwd=work)
    done = cli("edge-classify", work / "cells", "--model", bundled_model, "-o", out, "--resume", check=True)
    assert len(rows_of(out)) == N_SAMPLES
    assert f"{N_SAMPLES} already in the output" in done.stderr


# 4. the same cell counted once

def test_the_same_cell_given_three_ways_counts_once(bundled_model, tmp_path):
    cells = tmp_path / "cells"
    shutil.copytree(SAMPLES, cells)
    one = sorted((cells / "Parasitized").glob("C82*"))
    summary = tmp_path / "s.json"
    done = cli("edge-classify", cells / "Parasitized", str(cells / "Parasitized" / "C82*"), *one,
               "--model", bundled_model, "--summary-json", summary, check=True)
    s = json.loads(summary.read_text())
    n_para = len(list((cells / "Parasitized").glob("*.webp")))
    assert s["images"] == n_para and s["duplicates_dropped"] == 2 * len(one)
    assert len(list(csv.DictReader(done.stdout.splitlines()))) == n_para
    assert "duplicates" in done.stderr


def test_a_symlink_loop_is_not_followed(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(SAMPLES / "Uninfected", root)
    os.symlink(root, root / "loop")
    os.symlink(root, root / "again")
    found = expand_inputs([str(root)])
    assert len(found.images) == len(list((SAMPLES / "Uninfected").glob("*.webp")))
    found = expand_inputs([str(root / "**" / "*.webp")])
    assert len(found.images) == len(list((SAMPLES / "Uninfected").glob("*.webp")))


# 5. one run at a time on an output

def test_a_second_run_on_a_locked_output_says_who_holds_it(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    with OutputLock(out):
        done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out)
    assert done.returncode == 1 and one_line(done.stderr) and f"pid {os.getpid()}" in done.stderr
    assert not out.exists()
    cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", out, check=True)
    assert len(rows_of(out)) == N_SAMPLES and not Path(f"{out}.lock").exists()


def test_two_concurrent_resumes_never_double_a_row(bundled_model, tmp_path):
    cells = tmp_path / "cells"
    for i in range(6):
        shutil.copytree(SAMPLES, cells / f"copy{i}")
    out = tmp_path / "rows.csv"
    command = [str(BIN / "edge-classify"), str(cells), "--model", str(bundled_model), "-o", str(out), "--resume"]
    first, second = (subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2))
    results = [p.communicate(timeout=300) for p in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    rows = rows_of(out)
    assert len({r["path"] for r in rows}) == len(rows)
    if codes == [0, 1]:
        assert any("in use" in err for _, err in results)
    else:  # the first had finished before the second started: the second found everything done
        assert codes == [0, 0]
    assert len(rows) == 6 * N_SAMPLES


# 6. option ranges

@pytest.mark.parametrize("value", ["2", "inf", "nan", "-5", "50", "0", "1"])
def test_nonsense_thresholds_are_refused(bundled_model, value):
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "--threshold", value)
    assert done.returncode == 2 and "--threshold" in done.stderr


@pytest.mark.parametrize("option,value", [("--threads", "100000"), ("--threads", "0"), ("--batch-size", "0"),
                                          ("--batch-size", "100000")])
def test_absurd_threads_and_batch_sizes_are_refused(bundled_model, option, value):
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, option, value)
    assert done.returncode == 2 and option in done.stderr


def test_bench_refuses_zero_runs_and_leaves_no_temp_folder(bundled_model, tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("edge-bench-*"))
    done = cli("edge-bench", "cells", "--model", bundled_model, "--runs", "0", "--no-tutorial")
    assert done.returncode == 2 and "--runs" in done.stderr
    (tmp_path / "broken.png").write_bytes(b"not a png")
    done = cli("edge-bench", "cells", "--model", bundled_model, "--images", tmp_path, "--no-tutorial")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert set(Path(tempfile.gettempdir()).glob("edge-bench-*")) == before


# 7. a patient call only for cells that carry a patient id

def test_patient_ids_only_from_nih_names():
    assert patient_id("C100P61ThinF_IMG_20150918_144104_cell_162.png") == "100"
    assert patient_id("C37BP2_thinF_IMG_20150620_131423a_cell_92.webp") == "37"
    assert patient_id("C1_thinF_IMG_20150604_104722_cell_9.png") == "1"
    assert patient_id("C7NthinF_IMG_20150611_104404_cell_199.webp") == "7"
    assert patient_id("C59P20thinF_IMG_20150803_111333_cell_144.png") == "59"
    for camera in ("C0001.jpg", "C0001_0002.jpg", "C0001_IMG_1234.jpg", "C12.png", "Cell_3.png"):
        assert patient_id(camera) is None, camera


def test_cells_without_a_patient_id_get_no_patient_call(bundled_model, tmp_path):
    camera = tmp_path / "camera"
    camera.mkdir()
    for i, f in enumerate(sorted(SAMPLES.rglob("*.webp"))[:30]):
        shutil.copy(f, camera / f"C{i + 1:04d}.webp")
    summary = tmp_path / "s.json"
    done = cli("edge-classify", camera, "--model", bundled_model, "--group-by", "patient", "--summary-json", summary,
               check=True)
    s = json.loads(summary.read_text())
    assert s["groups"] == {} and s["without_patient_id"] == 30
    assert "30 cells carry no patient id" in done.stderr


# 8. one line instead of a traceback

def test_every_input_failing_gives_a_summary_and_exit_1(bundled_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    summary = tmp_path / "s.json"
    done = cli("edge-classify", bad, "--model", bundled_model, "--summary-json", summary, "--group-by", "folder")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "2 failed" in done.stderr and json.loads(summary.read_text())["failed"] == 2


def test_non_utf8_file_names_are_written_and_resumed(bundled_model, tmp_path):
    folder = tmp_path / "cells"
    shutil.copytree(SAMPLES, folder)
    raw = os.fsencode(folder / "Parasitized") + b"/caf\xe9_cell.webp"
    shutil.copy(ONE_CELL, raw)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"rows.{fmt}"
        done = cli("edge-classify", folder, "--model", bundled_model, "-o", out, "--format", fmt)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        data = out.read_bytes()
        assert data.count(b"\n") == N_SAMPLES + 1 + (fmt == "csv")
        out.write_bytes(data)  # already complete: a resume must find every image done
        again = cli("edge-classify", folder, "--model", bundled_model, "-o", out, "--format", fmt, "--resume")
        assert again.returncode == 0 and f"{N_SAMPLES + 1} already in the output" in again.stderr
        assert out.read_bytes() == data
    to_stdout = subprocess.run([str(BIN / "edge-classify"), str(folder), "--model", str(bundled_model)],
                               capture_output=True)
    assert to_stdout.returncode == 0 and b"caf\xe9_cell.webp" in to_stdout.stdout
    assert b"Traceback" not in to_stdout.stderr


@pytest.mark.parametrize("target", ["/dev/null", "/dev/stdout"])
def test_output_to_a_device_file_works(bundled_model, target):
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "-o", target)
    assert done.returncode == 0, done.stderr
    if target == "/dev/stdout":
        assert len(list(csv.DictReader(done.stdout.splitlines()))) == N_SAMPLES


def test_output_that_is_a_folder_or_in_a_missing_folder(bundled_model, tmp_path):
    for target in (tmp_path, tmp_path / "missing" / "rows.csv"):
        for option in ("-o", "--summary-json"):
            done = cli("edge-classify", SAMPLES, "--model", bundled_model, option, target)
            assert done.returncode == 2 and one_line(done.stderr), done.stderr


@pytest.mark.parametrize("content", [b"path,label\nx.webp\n", b"path,label\n\xff\xfe.webp,parasitized\n",
                                     b"path,label\n" + b"y" * 200_000 + b",parasitized\n", "dir"])
def test_malformed_labels_files_give_one_line(bundled_model, tmp_path, content):
    labels = tmp_path / "labels"
    if content == "dir":
        labels.mkdir()
    else:
        labels.write_bytes(content)
    done = cli("edge-classify", SAMPLES, "--model", bundled_model, "--labels", labels)
    assert done.returncode == 2 and one_line(done.stderr) and "labels" in done.stderr, done.stderr


def test_sigterm_writes_every_finished_row_and_says_how_to_resume(bundled_model, tmp_path):
    cells = tmp_path / "cells"
    for i in range(20):
        shutil.copytree(SAMPLES, cells / f"copy{i}")
    out = tmp_path / "rows.csv"
    run = subprocess.Popen([str(BIN / "edge-classify"), str(cells), "--model", str(bundled_model), "-o", str(out)],
                           stderr=subprocess.PIPE, text=True)
    _wait_for_rows(out, 20, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    if run.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert run.returncode == 130 and "--resume" in err and "Traceback" not in err
    done = cli("edge-classify", cells, "--model", bundled_model, "-o", out, "--resume", check=True)
    rows = rows_of(out)
    assert len(rows) == 20 * N_SAMPLES and len({r["path"] for r in rows}) == len(rows)
    assert "already in the output" in done.stderr


def _wait_for_rows(path, n, process, timeout=120):
    started = time.time()
    while time.time() - started < timeout and process.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") > n:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_kill_9_then_resume_loses_and_duplicates_nothing(bundled_model, tmp_path, fmt):
    cells = tmp_path / "cells"
    for i in range(20):
        shutil.copytree(SAMPLES, cells / f"copy{i}")
    out = tmp_path / f"rows.{fmt}"
    command = [str(BIN / "edge-classify"), str(cells), "--model", str(bundled_model), "-o", str(out), "--format", fmt]
    killed = 0
    for _ in range(3):
        run = subprocess.Popen(command + (["--resume"] if out.exists() else []), stderr=subprocess.DEVNULL)
        _wait_for_rows(out, 30 + 200 * killed, run)
        if run.poll() is None:
            run.kill()
            killed += 1
        run.wait()
    cli("edge-classify", *command[1:], "--resume", check=True)
    if fmt == "csv":
        paths = [r["path"] for r in rows_of(out)]
    else:
        paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert killed >= 1
    assert len(paths) == 20 * N_SAMPLES and len(set(paths)) == len(paths)


# 9. a mistyped path or an unreadable folder is not missed

def test_a_missing_path_next_to_valid_ones_exits_1_after_classifying_them(bundled_model, tmp_path):
    out = tmp_path / "rows.csv"
    done = cli("edge-classify", SAMPLES, tmp_path / "typo", "--model", bundled_model, "-o", out)
    assert done.returncode == 1 and "typo" in done.stderr
    assert len(rows_of(out)) == N_SAMPLES


def test_an_unreadable_subfolder_is_reported(bundled_model):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: chmod 000 does not stop root")
    base = Path(tempfile.mkdtemp(prefix="rel-unreadable-"))
    try:
        os.chmod(base, 0o755)
        shutil.copytree(SAMPLES, base / "cells")
        for p in [base / "cells", *(base / "cells").rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(base / "cells" / "Uninfected", 0o000)
        prefix = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else [])
        if prefix and subprocess.run(prefix + [sys.executable, "-c", "import malaria_edge"], capture_output=True,
                                     cwd="/").returncode != 0:
            pytest.skip("the unprivileged user cannot reach this checkout's Python (a parent folder is private)")
        code = ("import sys; from malaria_edge.edge_runtime.results_io import expand_inputs; "
                "found = expand_inputs([sys.argv[1]]); print(len(found.images)); print(*found.problems, sep='\\n')")
        done = subprocess.run(prefix + [sys.executable, "-c", code, str(base / "cells")], capture_output=True,
                              text=True, cwd="/")
        assert done.returncode == 0, done.stderr
        count, *problems = done.stdout.splitlines()
        assert int(count) == len(list((SAMPLES / "Parasitized").glob("*.webp")))
        assert any("Uninfected" in p and "cannot read" in p for p in problems)
    finally:
        os.chmod(base / "cells" / "Uninfected", 0o755)
        shutil.rmtree(base)


# 10. images that are not cells get no prediction

@pytest.mark.parametrize("size,colour,reason", [((1, 1), (200, 100, 120), "too small"),
                                                ((1, 50000), (200, 100, 120), "too small"),
                                                ((400, 60), (200, 100, 120), "aspect"),
                                                ((600, 600), (0, 0, 0), "no cell"),
                                                ((128, 128), (180, 90, 120), "uniform")])
def test_images_that_are_not_cells_are_refused(size, colour, reason):
    with pytest.raises(ImageError, match=reason):
        check_cell_plausible(Image.new("RGB", size, colour))


def test_real_cells_are_plausible(shared_data):
    for f in sorted(shared_data.rglob("*.webp"))[::97]:
        check_cell_plausible(Image.open(f).convert("RGB"))


def test_absurd_images_become_error_rows_not_predictions(bundled_model, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 100, 120)).save(folder / "dot.png")
    Image.new("RGB", (1, 50000), (200, 100, 120)).save(folder / "line.png")
    Image.new("RGB", (5000, 5000), (0, 0, 0)).save(folder / "black.png")
    shutil.copy(ONE_CELL, folder / "real.webp")
    out = tmp_path / "rows.csv"
    done = cli("edge-classify", folder, "--model", bundled_model, "-o", out)
    assert done.returncode == 1
    rows = rows_of(out)
    assert [Path(r["path"]).name for r in rows if r["prediction"]] == ["real.webp"]
    assert all(r["error"] and not r["prob_parasitized"] for r in rows if Path(r["path"]).name != "real.webp")
    for name in ("dot.png", "line.png", "black.png"):
        assert name in done.stderr


# 12. --labels quirks

def test_labels_with_a_bom_and_ambiguous_names(bundled_model, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    s1.mkdir(), s2.mkdir()
    shutil.copy(ONE_CELL, s1 / "cell_1.webp")
    shutil.copy(ONE_CELL, s2 / "cell_1.webp")
    shutil.copy(ONE_CELL, s2 / "cell_2.webp")
    labels = tmp_path / "labels.csv"
    labels.write_bytes("path,label\r\nx/cell_1.webp,parasitized\r\ny/cell_1.webp,uninfected\r\n"
                       "cell_2.webp,uninfected\r\n".encode("utf-8-sig"))
    done = cli("edge-classify", s1, s2, "--model", bundled_model, "--labels", labels, check=True)
    truth = {r["path"].split("/")[-2] + "/" + Path(r["path"]).name: r["true_label"]
             for r in csv.DictReader(done.stdout.splitlines())}
    assert truth == {"s1/cell_1.webp": "", "s2/cell_1.webp": "", "s2/cell_2.webp": "uninfected"}


# 13. a torn row whose path holds a newline

def test_a_torn_row_with_a_newline_in_its_path_survives_resume(bundled_model, tmp_path):
    folder = tmp_path / "cells"
    shutil.copytree(SAMPLES / "Uninfected", folder)
    shutil.copy(ONE_CELL, folder / "new\nline.webp")
    out = tmp_path / "rows.csv"
    cli("edge-classify", folder, "--model", bundled_model, "-o", out, check=True)
    data = out.read_bytes()
    cut = data.index(b"new\nline") + 5  # torn just after the newline inside the quoted path
    out.write_bytes(data[:cut])
    cli("edge-classify", folder, "--model", bundled_model, "-o", out, "--resume", check=True)
    rows = rows_of(out)
    names = sorted(Path(r["path"]).name for r in rows)
    assert len(rows) == len(list(folder.iterdir())) and "new\nline.webp" in names
    assert not any(r["path"].endswith('"') for r in rows)


# 14. bounded memory per image

def _peak_rss_mb(path) -> float:
    code = ("import resource, sys; from malaria_edge.edge_runtime.images import open_image, ImageError\n"
            "try:\n    open_image(sys.argv[1])\nexcept ImageError as exc:\n    print('refused', exc)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_a_25_megapixel_deep_tiff_stays_under_the_memory_bound(tmp_path, mode):
    side = 5000
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).reshape(side, side)
    arr = ramp.astype(np.uint16) if mode == "I;16" else ramp.astype(np.float32) / 65535.0
    path = tmp_path / "deep.tif"
    Image.fromarray(arr).save(path)
    del arr, ramp
    baseline = _peak_rss_mb(ONE_CELL)
    assert _peak_rss_mb(path) - baseline < IMAGE_MEMORY_BOUND / 2**20
