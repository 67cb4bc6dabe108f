"""The arm64 check's verdict (scripts/pi_check_report.py): rows from a real edge-classify run on the sample cells
pass against themselves, and a changed call, a probability moved past the tolerance or a lost row each fail it.
The emulated install itself (scripts/pi_check.sh) is too slow for the suite; its last report is committed."""
import copy
import importlib.util
import zipfile

import pytest

from conftest import REPO, cli

spec = importlib.util.spec_from_file_location("pi_check_report", REPO / "scripts" / "pi_check_report.py")
pi_check_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pi_check_report)


@pytest.fixture(scope="module")
def sample_rows(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("pi") / "rows.csv"
    cli("edge-classify", samples, "--threads", "1", "--compare", "-o", out, check=True)
    return pi_check_report.read_rows(out)


def test_same_rows_pass(sample_rows):
    diff = pi_check_report.diff_rows(sample_rows, copy.deepcopy(sample_rows))
    assert diff["predictions_identical"] and diff["within_tolerance"]
    assert diff["max_abs_prob_diff_int8"] == 0 and diff["rows"] == len(sample_rows) > 0


def test_changed_call_moved_probability_and_lost_row_fail(sample_rows):
    key = next(iter(sample_rows))
    flipped = copy.deepcopy(sample_rows)
    flipped[key]["prediction"] = "uninfected" if flipped[key]["prediction"] == "parasitized" else "parasitized"
    assert not pi_check_report.diff_rows(sample_rows, flipped)["predictions_identical"]

    moved = copy.deepcopy(sample_rows)
    moved[key]["ref_prob_parasitized"] = str(float(moved[key]["ref_prob_parasitized"]) + 2e-3)
    diff = pi_check_report.diff_rows(sample_rows, moved)
    assert diff["predictions_identical"] and not diff["within_tolerance"]
    assert diff["max_abs_prob_diff_fp32"] == pytest.approx(2e-3, abs=1e-6)

    lost = copy.deepcopy(sample_rows)
    del lost[key]
    diff = pi_check_report.diff_rows(sample_rows, lost)
    assert diff["missing"] == 1 and not diff["predictions_identical"]


def test_base_dependencies_for_a_board_skip_extras_and_windows_only(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    metadata = ("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: numpy>=1.21\n"
                "Requires-Dist: ai-edge-litert>=1.2; platform_system != \"Windows\"\n"
                "Requires-Dist: pywin32; platform_system == \"Windows\"\n"
                "Provides-Extra: fields\nRequires-Dist: opencv-python-headless>=4.8; extra == \"fields\"\n")
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo-1.0.dist-info/METADATA", metadata)
    assert pi_check_report.base_dependencies(wheel, []) == ["numpy>=1.21", "ai-edge-litert>=1.2"]
    assert pi_check_report.base_dependencies(wheel, ["ai_edge_litert"]) == ["numpy>=1.21"]



def _bundle_runs(tmp_path, network):
    runs = tmp_path / "runs"
    runs.mkdir(parents=True)
    (runs / "bundle.json").write_text(
        '{"name": "me-bundle", "folder_bytes": 74600000, "archive_bytes": 74000000, "wheels": ["a.whl"], '
        '"target": {"python": "3.11", "glibc": "2.36"}, "install": "malaria-edge[fields]==0.2.0", '
        '"build_seconds": 45.0, "install_seconds": 100.0, "install_exit_code": 0, "cpu": "cortex-a72", '
        '"venv": "/opt/pi-check/venvs/arm64-bundle"}')
    (runs / "bundle-network.txt").write_text(network)
    (runs / "bundle-install.log").write_text(
        "    0.1 install.sh: checking the bundle's files against SHA256SUMS\n"
        "    2.0 Processing ./wheels/click-8.5.1-py3-none-any.whl\n"
        "   70.5 install.sh: self-check: classifying the sample cells and one sample field that ship with the package\n"
        "   99.9 install.sh: OK: malaria-edge 0.2.0 installed in /opt/pi-check/venvs/arm64-bundle\n")
    return runs


def test_bundle_offline_proof_and_install_split(tmp_path):
    offline = ("1: lo: <LOOPBACK> mtu 65536 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/loopback\n"
               "interfaces seen inside the root: lo\n"
               "connect pypi.org:443: [Errno -3] Temporary failure in name resolution\n"
               "connect 151.101.0.223:443: [Errno 101] Network is unreachable\n")
    facts = pi_check_report.bundle_facts(_bundle_runs(tmp_path, offline), {})
    assert facts["offline"] and facts["pip_install_seconds"] == 70.5 and facts["self_check_seconds"] == 29.5
    assert facts["install_lines"][-1].startswith("install.sh: OK")
    assert "\\" not in "".join(facts["network"])

    online = offline.replace("[Errno 101] Network is unreachable", "CONNECTED")
    assert not pi_check_report.bundle_facts(_bundle_runs(tmp_path / "b", online), {})["offline"]
