"""Helper for scripts/pi_check.sh: describe a venv, list a wheel's base dependencies, and diff the arm64 rows
against the x86_64 rows into docs/pi_check/report.md and report.json.

Standard library only: ``describe`` runs inside each venv, including the emulated arm64 ones.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import sysconfig
import zipfile
from datetime import datetime, timezone
from pathlib import Path

PROB_TOLERANCE = 1e-3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
REFERENCE_RUN = "x86_64_ai_edge_litert"
KEY_DISTRIBUTIONS = ("malaria-edge", "numpy", "pillow", "click", "ai-edge-litert", "tflite-runtime",
                     "opencv-python-headless", "scipy")


def tree_bytes(path: Path) -> int:
    """Bytes of the files under path (like du -sb, without following links), leaving out __pycache__ folders: the
    emulated installs skip byte-compiling, so sizes compare only without them."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def describe() -> dict:
    """This interpreter's machine, versions and install size, for the venv it runs in."""
    site = Path(sysconfig.get_paths()["purelib"])
    versions = {}
    for name in KEY_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # edge-classify keeps the runtime's "Created TensorFlow Lite XNNPACK delegate" line off stderr (and TFLite logs it
    # once per process), so whether XNNPACK starts is probed here: the bundled int8 model on this venv's first
    # interpreter, built the way the runtime builds it, in a fresh process whose stderr is read.
    probe = ("import glob, os, malaria_edge.edge_runtime as e\n"
             "try:\n    from ai_edge_litert.interpreter import Interpreter\n"
             "except ImportError:\n    from tflite_runtime.interpreter import Interpreter\n"
             "m = sorted(glob.glob(os.path.join(os.path.dirname(e.__file__), 'models', '*_int8.tflite')))[0]\n"
             "Interpreter(model_path=m, num_threads=1).allocate_tensors()\n")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd="/")
        xnnpack = "XNNPACK delegate" in done.stderr if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        xnnpack = None
    entries = [(tree_bytes(p), p.name) for p in site.iterdir()
               if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"]
    return {"machine": platform.machine(), "python": platform.python_version(),
            "libc": " ".join(platform.libc_ver()), "versions": versions, "xnnpack_probe": xnnpack,
            "installed": sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()),
            "site_packages_bytes": tree_bytes(site), "malaria_edge_bytes": tree_bytes(site / "malaria_edge"),
            "largest_in_site_packages": [{"name": n, "bytes": b} for b, n in sorted(entries, reverse=True)[:6]]}


def base_dependencies(wheel: Path, without: list[str]) -> list[str]:
    """The wheel's requirements outside any extra whose markers hold on Linux aarch64, minus the named ones."""
    from pip._vendor.packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    board = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "aarch64", "extra": ""}
    skip = {n.lower().replace("_", "-") for n in without}
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower().replace("_", "-") in skip or (req.marker and not req.marker.evaluate(board)):
            continue
        out.append(f"{req.name}{req.specifier}")
    return out


def classify_fields(paths: list[str], out_csv: Path, summary_json: Path, threads: int) -> int:
    """Whole fields through the public API (``Classifier.classify_field``): one row per cell with its box."""
    from malaria_edge import Classifier

    if not hasattr(Classifier, "classify_field"):
        print("this version of malaria-edge has no field path (Classifier.classify_field)", file=sys.stderr)
        return 3
    images = []
    for path in paths:
        found = Path(path)
        images += (sorted(str(p) for p in found.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                   if found.is_dir() else [path])
    classifier = Classifier.load(threads=threads)
    fields = []
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "cell", "x", "y", "w", "h", "prediction", "prob_parasitized"])
        for path in images:
            result = classifier.classify_field(path)
            for cell in result.cells:
                writer.writerow([path, cell.index, *cell.box, cell.prediction, round(cell.prob_parasitized, 6)])
            fields.append({**result.summary(), "seconds_segment": result.seconds_segment,
                           "seconds_classify": result.seconds_classify, **field_input_hashes(result)})
    info = classifier.bundle.describe()
    summary_json.write_text(json.dumps({"classified": sum(f["cells"] for f in fields), "fields": fields,
                                        "model": {"backend": info["backend"],
                                                  "backend_version": info["backend_version"]}}, indent=2))
    return 0


def field_input_hashes(result) -> dict:
    """Hashes of the decoded field and of each cell's crop, so a difference between machines can be placed before
    or after the model (None where this version keeps neither the image nor the regions)."""
    import hashlib

    try:
        from malaria_edge.edge_runtime.segment import cut_cell
    except ImportError:
        return {}
    if result.image is None or any(cell.region is None for cell in result.cells):
        return {}
    digest = lambda a: hashlib.sha256(a.tobytes()).hexdigest()[:16]  # noqa: E731
    return {"image_sha256": digest(result.image),
            "crop_sha256": {str(cell.index): digest(cut_cell(result.image, cell.region)) for cell in result.cells}}


def compare_field_inputs(reference: dict, candidate: dict) -> dict:
    """Per field: is the decoded image identical, and on how many cells do the crops differ?"""
    out = []
    for a, b in zip(reference.get("fields", []), candidate.get("fields", [])):
        if "crop_sha256" not in a or "crop_sha256" not in b:
            continue
        crops = a["crop_sha256"]
        out.append({"field": a["source"], "image_identical": a["image_sha256"] == b["image_sha256"],
                    "cells": len(crops), "crops_differing": sum(crops[k] != b["crop_sha256"].get(k) for k in crops)})
    return out


def int8_kernels(paths: list[str], out_json: Path) -> int:
    """Raw int8 outputs of the bundled int8 model for each cell under each of ai-edge-litert's op resolvers (the
    default with XNNPACK, the built-in optimized kernels, the reference kernels), and a hash of the model input, so
    an x86_64/arm64 difference can be pinned on the preprocessing or on a kernel family."""
    import hashlib

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from malaria_edge import Classifier

    def quantize(batch, details):
        if details["dtype"] == np.float32:
            return batch.astype(np.float32)
        scale, zero = details["quantization"]
        if details["dtype"] == np.uint8 and (scale, zero) == (1.0, 0):
            return batch
        info = np.iinfo(details["dtype"])
        return np.clip(np.round(batch / np.float32(scale) + zero), info.min, info.max).astype(details["dtype"])

    classifier = Classifier.load(threads=1)
    pixels = {p: classifier.preprocess(p) for p in paths}
    out = {"input_sha256": {p: hashlib.sha256(x.tobytes()).hexdigest()[:16] for p, x in pixels.items()},
           "raw": {}}
    for resolver in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "BUILTIN_REF"):
        interpreter = Interpreter(model_path=str(classifier.bundle.path), num_threads=1,
                                  experimental_op_resolver_type=getattr(OpResolverType, resolver))
        interpreter.allocate_tensors()
        inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        raw = {}
        for path, x in pixels.items():
            interpreter.set_tensor(inp["index"], quantize(x[None], inp))
            interpreter.invoke()
            raw[path] = np.asarray(interpreter.get_tensor(outp["index"])).ravel().tolist()
        out["raw"][resolver] = raw
    out_json.write_text(json.dumps(out))
    return 0


def compare_kernels(reference: dict, candidate: dict) -> dict:
    """Per op resolver: on how many cells the raw int8 outputs of two machines differ, and by how many steps."""
    same_input = sum(reference["input_sha256"][p] == candidate["input_sha256"].get(p) for p in reference["input_sha256"])
    out = {"cells": len(reference["input_sha256"]), "identical_model_inputs": same_input, "resolvers": {}}
    for resolver, raw in reference["raw"].items():
        other = candidate["raw"].get(resolver, {})
        steps = [max(abs(a - b) for a, b in zip(raw[p], other[p])) for p in raw if p in other]
        out["resolvers"][resolver] = {"cells_differing": sum(s > 0 for s in steps),
                                      "max_steps": max(steps) if steps else None}
    out["against_reference_kernels"] = {}
    for machine, outputs in (("x86_64", reference), ("arm64", candidate)):
        raw, ref = outputs["raw"].get("AUTO", {}), outputs["raw"].get("BUILTIN_REF", {})
        steps = [max(abs(a - b) for a, b in zip(raw[p], ref[p])) for p in raw if p in ref]
        out["against_reference_kernels"][machine] = {"cells_differing": sum(s > 0 for s in steps),
                                                     "max_steps": max(steps) if steps else None}
    return out


def read_rows(path: Path) -> dict:
    with open(path, newline="") as fh:
        return {(r["path"], r.get("cell", "")): r for r in csv.DictReader(fh)}


def diff_rows(reference: dict, candidate: dict) -> dict:
    """Same rows (and boxes), identical predictions, probabilities within PROB_TOLERANCE; for the int8 model and
    for the fp32 model run beside it with --compare."""
    common = sorted(set(reference) & set(candidate))
    prediction_mismatches, over_tolerance, box_mismatches = [], [], []
    max_dp = max_ref_dp = 0.0
    for key in common:
        a, b = reference[key], candidate[key]
        if any(a.get(c, "") != b.get(c, "") for c in ("x", "y", "w", "h")):
            box_mismatches.append(list(key))
        pairs = [("", "prediction", "prob_parasitized")]
        if a.get("ref_prob_parasitized"):
            pairs.append(("fp32 ", "ref_prediction", "ref_prob_parasitized"))
        for tag, pred, prob in pairs:
            dp = abs(float(a[prob]) - float(b[prob]))
            if tag:
                max_ref_dp = max(max_ref_dp, dp)
            else:
                max_dp = max(max_dp, dp)
            if a[pred] != b[pred]:
                prediction_mismatches.append(f"{key[0]} {key[1]}: {tag}{a[pred]} vs {b[pred]}".strip())
            if dp > PROB_TOLERANCE:
                over_tolerance.append(f"{key[0]} {key[1]}: {tag}|dp| {dp:.4f}".strip())
    same_rows = set(reference) == set(candidate) and len(reference) > 0
    return {"rows_reference": len(reference), "rows": len(candidate), "same_rows": same_rows,
            "missing": len(set(reference) - set(candidate)), "extra": len(set(candidate) - set(reference)),
            "box_mismatches": box_mismatches, "prediction_mismatches": prediction_mismatches,
            "over_tolerance": over_tolerance, "max_abs_prob_diff_int8": max_dp, "max_abs_prob_diff_fp32": max_ref_dp,
            "predictions_identical": same_rows and not prediction_mismatches and not box_mismatches,
            "within_tolerance": same_rows and not over_tolerance}


def load_json(path: Path):
    return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def first_run_seconds(timings_log: Path, root_stamp: Path) -> dict:
    """A first run's time: measured when a logged run built the root, else the root build plus the last logged run
    that built every venv afresh (what a first run does after debootstrap)."""
    stamp = dict(kv.split("=", 1) for kv in root_stamp.read_text().split()) if root_stamp.exists() else {}
    build = float(stamp["built_seconds"]) if "built_seconds" in stamp else None
    measured = venv_run = None
    if timings_log.exists():
        for line in timings_log.read_text().splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            if "total_seconds" not in fields:
                continue
            if fields.get("root_built") == "1":
                measured = float(fields["total_seconds"])
            elif fields.get("venvs_built") and fields.get("venvs_built") == fields.get("venvs"):
                venv_run = (line.split()[0], float(fields["total_seconds"]))
    out = {"root_build_seconds": build, "root_built_at": stamp.get("built_at"), "first_run_seconds": measured,
           "first_run_estimated": measured is None, "fresh_venvs_run": venv_run}
    if measured is None and build is not None and venv_run:
        out["first_run_seconds"] = build + venv_run[1]
    return out


def report(args) -> int:
    check, out, repo = Path(args.check), Path(args.out), Path(args.repo)
    runs_dir = check / "runs"

    def note(name: str) -> str:
        p = runs_dir / name
        return p.read_text().strip() if p.exists() else ""

    runs = {}
    for meta_path in sorted(runs_dir.glob("*.meta.json")):
        meta = load_json(meta_path)
        label = meta["label"]
        csv_path = runs_dir / f"{label}.csv"
        meta["summary"] = load_json(runs_dir / f"{label}.summary.json") or {}
        meta["stderr_tail"] = note(f"{label}.stderr").splitlines()[-2:]
        meta["xnnpack"] = "XNNPACK delegate" in note(f"{label}.stderr") or None
        meta["rows"] = read_rows(csv_path) if csv_path.exists() else {}
        runs[label] = meta
    venvs = {p.name[len("venv-"):-len(".env.json")]: load_json(p) for p in sorted(runs_dir.glob("venv-*.env.json"))}
    for meta in runs.values():  # the run's own log line, else its venv's probe (see describe)
        if meta["xnnpack"] is None and (venvs.get(meta["venv"]) or {}).get("xnnpack_probe") is not None:
            meta["xnnpack"] = "probe" if venvs[meta["venv"]]["xnnpack_probe"] else False
    for meta in runs.values():
        ref = runs.get(meta.get("reference") or "")
        if ref is not None:
            meta["diff"] = diff_rows(ref["rows"], meta["rows"])
            if meta["kind"] == "fields":
                meta["field_inputs"] = compare_field_inputs(load_json(runs_dir / f"{ref['label']}.fieldinputs.json") or {},
                                                            load_json(runs_dir / f"{meta['label']}.fieldinputs.json") or {})
    bundle = bundle_facts(runs_dir, runs)
    for meta in runs.values():
        meta["rows"] = len(meta["rows"])
    kernels = None
    ref_k, arm_k = load_json(runs_dir / "x86_64.kernels.json"), load_json(runs_dir / "arm64.kernels.json")
    if ref_k and arm_k:
        kernels = compare_kernels(ref_k, arm_k)
    tflite = {"manylinux2014_aarch64_wheel_for_root_python": note("tflite_runtime_manylinux2014.txt") == "yes",
              "pip_download_in_root": note("tflite_runtime_download.txt"),
              "numpy_pin": note("tflite_runtime_numpy_pin.txt") or None,
              "next_python": note("tflite_runtime_next_python.txt")}
    phases = dict(p.split("=", 1) for p in args.phases.split()) if args.phases else {}
    timing = {"this_run_seconds": args.total_seconds, "root_built_this_run": args.root_built == "1",
              "venvs_built_this_run": int(args.venvs_built or 0),
              "phases_seconds": {k: float(v) for k, v in phases.items()},
              **first_run_seconds(check / "timings.log", Path(args.root) / ".pi-check-root")}
    compared = [m for m in runs.values() if "diff" in m and m["machine"] == "arm64"]
    verdict = {"runs_compared": len(compared),
               "all_ran": all(m["exit_code"] == 0 for m in runs.values()),
               "predictions_identical": bool(compared) and all(m["diff"]["predictions_identical"] for m in compared),
               "probabilities_within_tolerance": bool(compared) and all(m["diff"]["within_tolerance"]
                                                                        for m in compared)}
    if bundle:
        verdict["bundle_installed_offline"] = bundle["install_exit_code"] == 0 and bundle["offline"]
    verdict["passed"] = all(verdict[k] for k in ("all_ran", "predictions_identical", "probabilities_within_tolerance",
                                                 "bundle_installed_offline") if k in verdict)
    dirty = bool(git(repo, "status", "--porcelain", "--untracked-files=no"))
    result = {"generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "commit": git(repo, "rev-parse", "--short", "HEAD") + ("+uncommitted changes" if dirty else ""),
              "wheel": args.wheel, "inputs": args.inputs.split(), "field_inputs": args.field_inputs.split(),
              "tolerance": PROB_TOLERANCE, "verdict": verdict, "host": host_description(), "runs": runs,
              "venvs": venvs, "bundle": bundle, "int8_kernels": kernels, "tflite_runtime": tflite, "timing": timing,
              "notes": [line for line in note("notes.txt").splitlines() if line]}
    result = relative_to_root(result, str(Path(args.root).resolve()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(result))
    print(f"pi_check: {'PASS' if verdict['passed'] else 'FAIL'}: report in {out}/report.md", file=sys.stderr)
    return 0 if verdict["passed"] else 1


def bundle_facts(runs_dir: Path, runs: dict) -> dict | None:
    """The offline bundle's figures (runs/bundle.json from pi_check.sh), the proof that its install and runs had no
    network, install.sh's own lines, and its rows against the normal pip install of [fields] in the same root
    (``runs`` still holds the rows)."""
    bundle = load_json(runs_dir / "bundle.json")
    if not bundle:
        return None
    network = (runs_dir / "bundle-network.txt").read_text() if (runs_dir / "bundle-network.txt").exists() else ""
    links = [line.split(":")[1].strip() for line in network.splitlines() if line[:1].isdigit() and ":" in line]
    seen = next((line.split(":", 1)[1].split() for line in network.splitlines()
                 if line.startswith("interfaces seen inside the root:")), None)
    bundle["network"] = [line.split("\\")[0].strip() for line in network.splitlines() if line.strip()]
    bundle["offline"] = (links == ["lo"] and "state DOWN" in network and seen == ["lo"]
                         and "CONNECTED" not in network)
    log = (runs_dir / "bundle-install.log").read_text().splitlines() if (runs_dir / "bundle-install.log").exists() else []
    stamped = [(float(line[:7]), line[8:]) for line in log if line[:7].strip().replace(".", "", 1).isdigit()]
    pip_done = next((t for t, line in stamped if "self-check: classifying" in line), None)
    bundle["pip_install_seconds"] = pip_done
    bundle["self_check_seconds"] = (round(bundle["install_seconds"] - pip_done, 1)
                                    if pip_done is not None else None)
    bundle["install_lines"] = [line for _, line in stamped if line.startswith("install.sh:")]
    bundle["against_arm64_pip_install"] = {}
    for label, meta in runs.items():
        if not label.startswith("bundle-"):
            continue
        normal = {"cells": f"cells-arm64-{meta['cpu']}-fields", "fields": f"fields-arm64-{meta['cpu']}"}[meta["kind"]]
        if normal in runs and isinstance(runs[normal]["rows"], dict):
            d = diff_rows(runs[normal]["rows"], meta["rows"])
            bundle["against_arm64_pip_install"][label] = {
                "reference": normal, "rows": d["rows"], "predictions_identical": d["predictions_identical"],
                "max_abs_prob_diff_int8": d["max_abs_prob_diff_int8"],
                "max_abs_prob_diff_fp32": d["max_abs_prob_diff_fp32"], "within_tolerance": d["within_tolerance"]}
    return bundle


def render_bundle(r: dict) -> list[str]:
    b = r.get("bundle")
    if not b:
        return []
    yes = {True: "yes", False: "**no**"}
    runs = {k: v for k, v in r["runs"].items() if k.startswith("bundle-")}
    lines = ["", "## Offline bundle (edge-bundle) installed and run in the arm64 root with no network", "",
             f"`edge-bundle OUT --platform aarch64 --python {b['target']['python']} --glibc {b['target']['glibc']} "
             f"--wheel <our wheel>` on this host in {b['build_seconds']:.0f} s (wheels from PyPI; pip's download cache makes a "
             f"repeat fast): {len(b['wheels'])} wheels, "
             f"folder {mib(b['folder_bytes'])}, `{b['name']}.tar.gz` {mib(b['archive_bytes'])}. The tar.gz is unpacked "
             f"in the root's `/opt`, then, with qemu emulating {b['cpu']} ({BOARDS.get(b['cpu'], '')}):", "",
             f"    unshare --net chroot <root> /bin/sh -c 'cd /opt/{b['name']} && ./install.sh {b['venv']}'", "",
             f"Installed offline: {yes[b['install_exit_code'] == 0 and b['offline']]}. install.sh exit "
             f"{b['install_exit_code']} in {b['install_seconds']:.0f} s emulated"
             + (f" (SHA256SUMS, venv and `pip install --no-index` {b['pip_install_seconds']:.0f} s, its self-check "
                f"{b['self_check_seconds']:.0f} s)" if b.get("pip_install_seconds") is not None else "") + "; it said:",
             ""] + [f"    {line}" for line in b["install_lines"]] + [
             "", "No network (every bundle step ran in a new network namespace, `unshare --net`):", ""] + [
             f"    {line}" for line in b["network"]] + [""]
    for label, m in runs.items():
        d = m.get("diff")
        if not d:
            lines.append(f"- `{label}`: exit {m['exit_code']}, no rows to compare")
            continue
        a = b["against_arm64_pip_install"].get(label)
        wall = m["wall_seconds"]
        images = (m.get("summary") or {}).get("images") or m["rows"]
        per = (f"{wall / max(m['rows'], 1):.2f} s per cell" if m["kind"] == "cells"
               else f"{images} fields, {wall / max(images, 1):.1f} s per field")
        lines.append(f"- `{label}` ({m['rows']} rows, {wall:.1f} s emulated, {per} including start-up): against the "
                     f"normal x86_64 install: same rows {yes[d['same_rows']]}, calls identical "
                     f"{yes[d['same_rows'] and not d['prediction_mismatches']]}, boxes differ on "
                     f"{len(d['box_mismatches'])}, max |dp| int8 {d['max_abs_prob_diff_int8']:.2g}"
                     + (f", fp32 {d['max_abs_prob_diff_fp32']:.2g}" if m["kind"] == "cells" else "")
                     + (f"; against the normal pip install in this root (`{a['reference']}`): same rows and calls "
                        f"{yes[a['predictions_identical']]}, boxes included, max |dp| int8 {a['max_abs_prob_diff_int8']:.2g}" if a else "")
                     + ".")
    env, normal = r["venvs"].get("arm64-bundle"), r["venvs"].get("arm64-fields")
    if env and normal:
        drop = ("pip==", "setuptools==")
        only = sorted(set(x for x in env["installed"] if not x.startswith(drop)) - set(normal["installed"]))
        lines += ["", "Versions the bundle installed that the root's normal pip install did not: "
                  + (", ".join(only) if only else "none") + "."]
    return lines


def host_description() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}".strip()


BOARDS = {"cortex-a53": "Pi 3 / Zero 2 W", "cortex-a72": "Pi 4 / 400", "cortex-a76": "Pi 5", "host": "this host"}


def render_markdown(r: dict) -> str:
    t, v, runs = r["timing"], r["verdict"], r["runs"]
    yes = {True: "yes", False: "**no**"}
    field_runs = [m for m in runs.values() if m["kind"] == "fields"]
    over, identical = [], []
    for label, m in runs.items():
        d = m.get("diff")
        if not d or m["machine"] != "arm64":
            continue
        if d["same_rows"] and d["max_abs_prob_diff_int8"] == 0 and d["max_abs_prob_diff_fp32"] == 0:
            identical.append(label)
        if d["within_tolerance"]:
            continue
        why = ""
        crops = [f for f in m.get("field_inputs") or [] if f["crops_differing"]]
        if crops:
            why = "; ".join(f"{f['crops_differing']} of {f['cells']} cell crops cut by OpenCV differ in pixels"
                            for f in crops)
        elif "tflite" in m["venv"] and d["max_abs_prob_diff_fp32"] == 0:
            why = "fp32 rows identical, so tflite-runtime's int8 kernels round differently on x86_64 and arm64"
        over.append(f"`{label}` (max {d['max_abs_prob_diff_int8']:.2g}{', ' + why if why else ''})")
    identical_text = (f"Bit-identical to x86_64 (every probability, int8 and fp32): {', '.join('`' + i + '`' for i in identical)}."
                      if identical else "No arm64 run was bit-identical to x86_64.")
    field_text = (f"; whole fields {', '.join('`' + i + '`' for i in r['field_inputs'])} through `edge-classify "
                  "<fields> --input-kind field --threads 1` (one row per cell found, with its box); the same fields "
                  "also go through `Classifier.classify_field`, which hashes each decoded field and cell crop"
                  if r["field_inputs"] and field_runs else "")
    lines = [
        "# 64-bit Pi install, checked without a Pi",
        "",
        f"Generated by `scripts/pi_check.sh` at {r['generated_at']} from commit `{r['commit']}` "
        f"(wheel `{r['wheel']}`), on {r['host']}.",
        "",
        f"**Result: {'PASS' if v['passed'] else 'FAIL'}** - every run finished: {yes[v['all_ran']]}; same rows, "
        f"boxes and calls as x86_64 in all {v['runs_compared']} arm64 runs: {yes[v['predictions_identical']]}; "
        f"P(parasitized) within {r['tolerance']:g} of x86_64: "
        + ("yes" if v["probabilities_within_tolerance"] else
           f"**no** in {len(over)} of {v['runs_compared']}: " + "; ".join(over)) + ".",
        "",
        f"{identical_text}",
        "",
        "How: a Debian bookworm arm64 root (debootstrap, the base of 64-bit Raspberry Pi OS 12) runs under qemu-user "
        "(`qemu-aarch64-static` registered with binfmt_misc, in a chroot), with qemu emulating the core of each Pi "
        "(`QEMU_CPU`) and the root showing that core's `/proc/cpuinfo`, so the interpreter picks the kernels it "
        "would pick on the board. Our wheel and its dependencies (wheels from PyPI, see Notes) are installed there "
        "by pip, as on a Pi. Each arm64 run is diffed against the same command on this x86_64 host in a venv with "
        "the same install.",
        "",
        f"Inputs: cells {', '.join('`' + i + '`' for i in r['inputs'])} through `edge-classify <inputs> --threads 1 "
        f"--compare` (int8 model, and the fp32 model beside it){field_text}.",
        "",
        "| run | CPU emulated | venv (install) | interpreter that ran | rows | same rows and predictions | "
        "max \\|dp\\| int8 | max \\|dp\\| fp32 | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in runs.items():
        s, d = m.get("summary") or {}, m.get("diff")
        model = s.get("model") or {}
        backend = (f"{model.get('backend')} {model.get('backend_version')}"
                   + {True: " + XNNPACK", "probe": " + XNNPACK (venv probe)", False: " (XNNPACK not logged)"}.get(
                       m.get("xnnpack"), "")) if model else f"did not run (exit {m['exit_code']})"
        cpu = m["cpu"] if m["cpu"] == "host" else f"{m['cpu']} ({BOARDS.get(m['cpu'], '')})"
        wall = f"{m['wall_seconds']:.1f} s" + (" emulated" if m["machine"] == "arm64" else "")
        same = "reference" if d is None else (f"{yes[d['predictions_identical']]} ({d['rows']}/{d['rows_reference']} rows"
                                              + (f", {len(d['prediction_mismatches'])} calls differ" if d['prediction_mismatches'] else "") + ")")
        dp = "" if d is None else f"{d['max_abs_prob_diff_int8']:.2e}" + ("" if d["within_tolerance"] else f" ({len(d['over_tolerance'])} over {r['tolerance']:g})")
        dp32 = "" if d is None or m["kind"] == "fields" else f"{d['max_abs_prob_diff_fp32']:.2e}"
        lines.append(f"| {label} | {cpu} | {m['venv']} | {backend} | {m['rows']} | {same} | {dp} | {dp32} | {wall} |")
    lines += ["", "Wall times of arm64 runs are qemu emulation on this host, not Pi timings: they only show the "
              "install runs. Interpreter latency p50 per cell (same caveat): "
              + "; ".join(f"{label} {m['summary']['model']['latency_ms_p50']:.2f} ms" for label, m in runs.items()
                          if (m.get("summary") or {}).get("model", {}).get("latency_ms_p50")) + "."]
    for label, m in runs.items():
        d = m.get("diff")
        if m["exit_code"] != 0:
            lines += ["", f"`{label}` exited {m['exit_code']}: {' / '.join(m['stderr_tail'])}"]
        if d and (d["prediction_mismatches"] or d["box_mismatches"] or not d["same_rows"]):
            lines += ["", f"`{label}`: {d['missing']} rows missing, {d['extra']} extra, boxes differ on "
                      f"{len(d['box_mismatches'])}, calls differ: {'; '.join(d['prediction_mismatches'][:5])}"]
    for label, m in runs.items():
        for f in m.get("field_inputs") or []:
            lines += ["", f"`{label}`, field `{f['field']}`: decoded image identical to x86_64: "
                      f"{'yes' if f['image_identical'] else 'no'}; cell crops (cut by OpenCV) that differ in any "
                      f"pixel: {f['crops_differing']} of {f['cells']}."
                      + (" So this field's probability differences come from the crops OpenCV cuts (its arm64 and "
                         "x86_64 code paths differ in a few pixels), not from the interpreter."
                         if f["crops_differing"] and f["image_identical"] and not m["diff"]["within_tolerance"]
                         else "")]
    lines += render_bundle(r)
    k = r.get("int8_kernels")
    if k:
        lines += ["", "## int8 outputs on x86_64 and arm64, per kernel family", "",
                  f"The model input (decoded, cut and resized cell) is byte-identical on both machines for "
                  f"{k['identical_model_inputs']} of {k['cells']} cells. The raw int8 output of the int8 model, per "
                  "ai-edge-litert op resolver (x86_64 host vs arm64 emulating a Pi 4):", "",
                  "| op resolver | cells whose int8 output differs | largest difference (quantization steps) |",
                  "|---|---|---|"]
        for resolver, c in k["resolvers"].items():
            lines.append(f"| {resolver} | {c['cells_differing']} of {k['cells']} | {c['max_steps']} |")
        against = k.get("against_reference_kernels", {})
        lines += ["", "AUTO is what `edge-classify` runs (XNNPACK); BUILTIN_WITHOUT_DEFAULT_DELEGATES the built-in "
                  "optimized kernels; BUILTIN_REF the portable reference kernels; a 0 in the table means both machines give "
                  "identical int8 outputs with those kernels. "
                  + " ".join(f"On {m}, AUTO differs from the reference kernels on {c['cells_differing']} of "
                             f"{k['cells']} cells (at most {c['max_steps']} steps)." for m, c in against.items())
                  + " One output step moves P(parasitized) by up to a few thousandths, so a few steps exceed the "
                  "1e-3 tolerance without changing a call."]
    lines += ["", "## Install size (site-packages of each venv, its pip and setuptools included, without __pycache__)", "",
              "| venv | machine | site-packages | of which malaria_edge | largest entries |", "|---|---|---|---|---|"]
    for name, env in r["venvs"].items():
        if env:
            largest = ", ".join(f"{e['name']} {mib(e['bytes'])}" for e in env["largest_in_site_packages"][:5])
            lines.append(f"| {name} | {env['machine']} | {mib(env['site_packages_bytes'])} | "
                         f"{env['malaria_edge_bytes'] / 1024:.0f} KiB | {largest} |")
    lines += ["", "Versions (pip's choice from PyPI for each venv; the x86_64 venvs take this host's package "
              "mirror):", ""]
    for name, env in r["venvs"].items():
        if env:
            lines.append(f"- {name}: Python {env['python']} ({env['libc']}), {', '.join(env['installed'])}")
    tf = r["tflite_runtime"]
    lines += ["", "## tflite-runtime (the interpreter some boards get)", ""]
    if any(m["venv"].endswith("tflite-runtime") for m in runs.values()):
        lines.append("PyPI has a tflite-runtime wheel for aarch64 and the root's Python (pip inside the arm64 root "
                     f"chose `{tf['pip_download_in_root'].splitlines()[-1]}`). Its venv holds our wheel, our base "
                     "dependencies and tflite-runtime, no ai-edge-litert (as on a board where ai-edge-litert has no "
                     "wheel). Its rows above (`--backend tflite_runtime`): the arm64 run against the same install on x86_64, and "
                     "x86_64 tflite-runtime against x86_64 ai-edge-litert (another interpreter version, so other int8 "
                     "kernels).")
    else:
        lines.append("No tflite-runtime run: " + (tf["pip_download_in_root"] or "skipped (--no-tflite-runtime)"))
    if tf["numpy_pin"]:
        lines += ["", f"numpy: {tf['numpy_pin']} So a tflite-runtime install needs `numpy<2` "
                  "(`pip install malaria-edge[tflite-runtime]` does not pin it today)."]
    if not tf["manylinux2014_aarch64_wheel_for_root_python"]:
        lines += ["", "`pip download tflite-runtime --platform manylinux2014_aarch64 --python-version <root's Python> "
                  "--only-binary=:all:` finds nothing: the aarch64 wheels of the newest tflite-runtime are tagged "
                  "`manylinux_2_34` (glibc >= 2.34: Debian bookworm / Raspberry Pi OS 12 or newer), which pip on "
                  "the board accepts."]
    if tf["next_python"]:
        which, answer = tf["next_python"].split(": ")
        lines += ["", f"tflite-runtime wheel for the next Python ({which}, as in Debian trixie / Raspberry Pi OS 13) "
                  f"on PyPI: {answer}" + ("; there ai-edge-litert is the only interpreter." if answer == "no" else ".")]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", "## How long it takes", ""]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in t["phases_seconds"].items())
    lines.append(f"- This run: {t['this_run_seconds']:.0f} s "
                 f"({'root built in this run' if t['root_built_this_run'] else 'cached root reused'}, "
                 f"{t['venvs_built_this_run']} of {len(r['venvs'])} venvs built afresh, the others reused); phases: "
                 f"{phases}.")
    if t.get("first_run_seconds") is not None:
        how = (f"the root build plus the run of {t['fresh_venvs_run'][0]} that built every venv afresh"
               if t["first_run_estimated"] else "measured")
        lines.append(f"- First run (builds the root and the venvs): {t['first_run_seconds']:.0f} s ({how}); debootstrap "
                     f"of the arm64 root alone {t['root_build_seconds']:.0f} s (built {t['root_built_at']}).")
    elif t.get("root_build_seconds") is not None:
        lines.append(f"- First run: debootstrap of the arm64 root alone took {t['root_build_seconds']:.0f} s (built "
                     f"{t['root_built_at']}), plus building the venvs (no run logged that built them all yet).")
    lines += ["- On 2 cores shared with other jobs, emulated steps under `nice -n 10`: expect variation with load.",
              "- Too slow for every CI run; run it before a release and after changing dependencies, the model or "
              "the runtime.", "",
              "Rerun: `sudo scripts/pi_check.sh` (`--help` for options); the root and venvs are cached in the "
              "folder given by `--root` (default `$PI_ROOT`, else `~/.cache/malaria-edge/pi-root`).", ""]
    return "\n".join(lines)


def relative_to_root(value, root: str):
    """Every path under the throwaway root written as ``<root>/...``: a committed report names no folder of the
    machine that ran it."""
    if isinstance(value, dict):
        return {k: relative_to_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to_root(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root.rstrip("/") + "/", "<root>/").replace(root.rstrip("/"), "<root>")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("describe", help="JSON: machine, versions and sizes of the venv this Python runs in")
    deps = sub.add_parser("base-deps", help="print the wheel's base requirements for Linux aarch64")
    deps.add_argument("wheel", type=Path)
    deps.add_argument("--without", action="append", default=[])
    fields = sub.add_parser("classify-fields", help="classify whole fields through Classifier.classify_field")
    fields.add_argument("paths", nargs="+")
    fields.add_argument("--output", type=Path, required=True)
    fields.add_argument("--summary-json", type=Path, required=True)
    fields.add_argument("--threads", type=int, default=1)
    kern = sub.add_parser("int8-kernels", help="raw int8 outputs per op resolver, as JSON")
    kern.add_argument("paths", nargs="+")
    kern.add_argument("--output", type=Path, required=True)
    rep = sub.add_parser("report", help="diff the runs and write report.md and report.json")
    for name in ("--check", "--root", "--out", "--repo", "--wheel", "--inputs", "--field-inputs", "--phases",
                 "--root-built", "--venvs-built"):
        rep.add_argument(name, required=name not in ("--phases", "--field-inputs", "--venvs-built"), default="")
    rep.add_argument("--total-seconds", type=float, required=True)
    args = parser.parse_args()
    if args.command == "describe":
        print(json.dumps(describe(), indent=2))
        return 0
    if args.command == "base-deps":
        print("\n".join(base_dependencies(args.wheel, args.without)))
        return 0
    if args.command == "classify-fields":
        return classify_fields(args.paths, args.output, args.summary_json, args.threads)
    if args.command == "int8-kernels":
        return int8_kernels(args.paths, args.output)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
