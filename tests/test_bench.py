"""edge-bench on a tiny model: structure and units, ratios, the energy arithmetic, the 'estimated' label."""
import json

import pytest

from malaria_edge.benchmarks.energy import PROFILES, active_watts, energy_report
from conftest import cli


@pytest.fixture(scope="module")
def bench_report(tiny_bundle, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = cli("edge-bench", "--model", tiny_bundle, "--images", samples, "--runs", 40, "--warmup", 5,
               "--threads", 1, "--battery-wh", 20, "--json", out / "bench.json", "--plot", out / "bench.png",
               check=True)
    return json.loads((out / "bench.json").read_text()), done, out


def test_report_structure_and_units(bench_report):
    report, done, out = bench_report
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
