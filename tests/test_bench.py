"""edge-bench on a tiny model and the bundled one: its modes and their help, structure and units, ratios, the energy
arithmetic, the 'estimated' label, tool_version in every JSON."""
import json
import math
from pathlib import Path

import pytest

from malaria_edge.benchmarks.energy import PROFILES, active_watts, energy_report
from malaria_edge.edge_runtime.version import __version__
from conftest import cli

SHARED_FIELDS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fields" / "iml_vivax" / "images"


@pytest.fixture(scope="module")
def bench_report(tiny_bundle, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = cli("edge-bench", "cells", "--model", tiny_bundle, "--images", samples, "--runs", 40, "--warmup", 5,
               "--threads", 1, "--battery-wh", 20, "--json", out / "bench.json", "--plot", out / "bench.png",
               check=True)
    return json.loads((out / "bench.json").read_text()), done, out


def test_report_structure_and_units(bench_report):
    report, done, out = bench_report
    assert report["tool_version"] == __version__
    assert report["machine"]["cpu"] and report["settings"]["threads"] == 1
    names = [m["role"] for m in report["models"]]
    assert names[:2] == ["model", "reference"] and "tutorial" in names
    units = {"file_size": "MB", "load": "ms", "first_inference": "ms", "latency_p50": "ms", "latency_p95": "ms",
             "latency_mean": "ms", "latency_std": "ms", "throughput": "cells/s", "cpu_per_cell": "ms",
             "peak_rss": "MB"}
    for m in report["models"]:
        assert m["backend"] and m["backend_version"]
        for key, unit in units.items():
            assert m["figures"][key]["unit"] == unit
        assert m["figures"]["latency_p50"]["value"] > 0 and m["figures"]["peak_rss"]["value"] > 0
    assert (out / "bench.png").stat().st_size > 1000
    assert "latency_p50" in done.stdout and "mJ/cell" in done.stdout


def test_ratios_are_ratios_of_figures(bench_report):
    report = bench_report[0]
    ref = next(m for m in report["models"] if m["role"] == "reference")
    for m in report["models"]:
        for key in ("latency_p50", "throughput", "peak_rss", "load"):
            f = m["figures"][key]
            assert f["ratio_to_reference"] == pytest.approx(f["value"] / ref["figures"][key]["value"])
    assert ref["figures"]["latency_p50"]["ratio_to_reference"] == pytest.approx(1.0)
    tutorial = next(m for m in report["models"] if m["role"] == "tutorial")
    model = report["models"][0]
    assert model["speedup_vs_tutorial"] == pytest.approx(
        tutorial["figures"]["latency_p50"]["value"] / model["figures"]["latency_p50"]["value"])


def test_energy_is_estimated_from_the_profile_without_a_meter(bench_report):
    report = bench_report[0]
    profile = PROFILES["raspberry-pi-4"]
    watts = active_watts(profile, 1)
    assert report["energy"]["basis"] == "estimated" and profile["source"] in report["energy"]["profile_text"]
    for m in report["models"]:
        e = m["energy"]
        seconds = m["figures"]["latency_mean"]["value"] / 1000.0
        assert e["basis"] == "estimated"
        assert e["energy_per_cell"]["value"] == pytest.approx(watts * seconds * 1000.0)
        assert e["slide_seconds"]["value"] == pytest.approx(seconds * 5000)
        assert e["slides_per_charge"]["value"] == pytest.approx(20 * 3600 / (watts * seconds * 5000))


def test_energy_arithmetic_by_hand():
    e = energy_report(0.002, 4.0, 5000, 10.0)
    assert e["energy_per_cell"] == {"value": pytest.approx(8.0), "unit": "mJ"}
    assert e["cells_per_wh"]["value"] == pytest.approx(450_000)
    assert e["slide_energy"]["value"] == pytest.approx(40_000)
    assert e["slides_per_charge"]["value"] == pytest.approx(900)
    measured = energy_report(0.002, 4.0, 5000, None, measured_joules_per_cell=0.004, label="measured")
    assert measured["energy_per_cell"]["value"] == pytest.approx(4.0) and measured["basis"] == "measured"


def test_end_to_end_times_every_stage_on_one_core(tiny_bundle, samples, tmp_path):
    """Files in -> rows on disk: the sample cells repeated to 60 distinct paths, each stage timed, and
    edge-classify's own run timed on the same core."""
    done = cli("edge-bench", "e2e", "--model", tiny_bundle, "--images", samples, "--limit", 60,
               "--batch", 1, "--batch", 8, "--json", tmp_path / "e2e.json", check=True)
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["tool_version"] == __version__
    assert report["cells"] == 60 and report["distinct_files"] == 41 and report["threads"] == 1
    assert [r["batch"] for r in report["runs"]] == [1, 8]
    for run in report["runs"]:
        assert run["failed"] == 0
        assert all(run["seconds"][s] > 0 and run["cpu_seconds"][s] >= 0 for s in ("decode", "preprocess",
                                                                                   "interpreter", "write"))
        assert run["wall_seconds"] >= sum(run["seconds"].values())
        assert run["edge_classify_wall_seconds"] > 0
    assert "files -> rows" in done.stdout and "edge-classify" in done.stdout


def test_fields_bench_reports_seconds_and_energy_per_field_and_slide(tiny_bundle, tmp_path):
    fields = SHARED_FIELDS
    if not fields.is_dir():
        pytest.skip("../shared/data/fields is absent")
    done = cli("edge-bench", "fields", fields, "--limit", 1, "--model", tiny_bundle, "--json",
               tmp_path / "fields.json", check=True)
    report = json.loads((tmp_path / "fields.json").read_text())
    assert report["tool_version"] == __version__ and len(report["fields"]) == 1
    row = report["fields"][0]
    assert row["cells"] > 0 and row["total"] >= row["segment"] + row["classify"] > 0
    energy = report["energy"]
    assert energy["basis"] in ("estimated", "measured")
    assert energy["fields_per_slide"] == math.ceil(5000 / energy["cells_per_field"])
    if energy["basis"] == "estimated":
        assert energy["joules_per_field"] == pytest.approx(energy["watts"] * energy["seconds_per_field"])
    assert energy["slide_joules"] == pytest.approx(energy["joules_per_field"] * energy["fields_per_slide"])
    assert "J per field" in done.stdout


@pytest.mark.parametrize("mode", ["cells", "fields", "e2e", "phone"])
def test_each_mode_has_its_own_help_with_examples(mode):
    done = cli("edge-bench", mode, "--help", check=True)
    assert f"Usage: edge-bench {mode}" in done.stdout and "Examples:" in done.stdout
    examples = done.stdout.split("Examples:")[1].split("Options:")[0]
    assert f"edge-bench {mode}" in examples


def test_limit_says_its_unit_in_each_mode():
    assert "--limit CELLS" in cli("edge-bench", "cells", "--help", check=True).stdout
    assert "--limit CELLS" in cli("edge-bench", "e2e", "--help", check=True).stdout
    assert "--limit FIELDS" in cli("edge-bench", "fields", "--help", check=True).stdout


def test_bare_edge_bench_lists_the_modes_and_measures_nothing():
    done = cli("edge-bench", check=True)
    assert all(mode in done.stdout for mode in ("cells", "fields", "e2e", "phone")) and "Examples:" in done.stdout


def test_version_is_the_tools_version():
    done = cli("edge-bench", "--version", check=True)
    assert done.stdout.strip() == f"edge-bench (malaria-edge) {__version__}"


def test_a_short_cells_run_of_the_bundled_model_writes_figures_with_units(samples, tmp_path):
    """The README's quick look: the bundled int8 model against its fp32 model on 20 of the sample cells."""
    done = cli("edge-bench", "cells", "--limit", 20, "--threads", 1, "--json", tmp_path / "cells.json",
               check=True)
    report = json.loads((tmp_path / "cells.json").read_text())
    assert report["tool_version"] == __version__
    assert report["settings"]["images"] == 20 and report["settings"]["limit"] == 20
    assert [m["role"] for m in report["models"]][:2] == ["model", "reference"]
    for m in report["models"]:
        assert all(f["unit"] for f in m["figures"].values()) and m["figures"]["latency_p50"]["value"] > 0
        assert m["energy"]["energy_per_cell"]["unit"] == "mJ"
    for unit in (" ms ", " MB ", " mJ/cell", " s and ", " J"):
        assert unit in done.stdout, unit
