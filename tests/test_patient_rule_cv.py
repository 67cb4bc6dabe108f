"""tools/patient_rule_cv.py: every NIH training patient held out by exactly one fold, never a test patient."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folds_hold_out_each_training_patient_once(sample_manifest, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "patient_rule_cv.py"), "folds", "--manifest",
                    str(sample_manifest), "--out", str(tmp_path), "--folds", "2"], check=True, capture_output=True)
    original = _rows(sample_manifest)
    train = {r["patient"] for r in original if r["split"] == "train"}
    test = {r["patient"] for r in original if r["split"] == "test"}
    plan = json.loads((tmp_path / "folds.json").read_text())["folds"]
    assert sorted(p for fold in plan for p in fold) == sorted(train)  # each once
    for k, held in enumerate(plan):
        rows = _rows(tmp_path / f"fold_{k}" / "manifest.csv")
        assert {r["patient"] for r in rows if r["split"] == "test"} == set(held)
        assert not test & {r["patient"] for r in rows}  # the real test patients are gone
        assert {r["patient"] for r in rows if r["split"] == "train"} == train - set(held)
        kept = {r["path"]: r for r in rows}
        assert all(kept[r["path"]]["split"] == r["split"] for r in original if r["split"] == "val")
