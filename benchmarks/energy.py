"""Energy: a real meter where the machine has one (Linux powercap/RAPL counters, or a battery's power_supply
readings), else an estimate from a device power profile, always labelled as such."""
from __future__ import annotations

import glob
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

# Whole-board power with the CPU idle, and the extra power of each busy core. Estimates from public measurements;
# they apply the device's power to the latency measured where edge-bench runs, so run edge-bench on the device
# itself for its own latency.
PROFILES: Dict[str, Dict] = {
    "raspberry-pi-4": {
        "watts_idle": 2.7, "watts_per_busy_core": 0.925, "cores": 4,
        "source": "Raspberry Pi 4 Model B at the USB-C input: 2.7 W idle, 6.4 W with stress --cpu 4 "
                  "(RasPi.TV power measurements, A. Eames, 2019); per-core share = (6.4 - 2.7) / 4",
    },
    "raspberry-pi-5": {
        "watts_idle": 3.0, "watts_per_busy_core": 1.2, "cores": 4,
        "source": "Raspberry Pi 5 at the USB-C input: about 3 W idle and about 7.8 W with all four cores loaded "
                  "(independent reviewers' USB power-meter tests, 2023-2024; approximate); per-core share "
                  "= (7.8 - 3.0) / 4",
    },
    "phone": {
        "watts_idle": 0.6, "watts_per_busy_core": 1.5, "cores": 8,
        "source": "typical Android phone, screen off: about 0.6 W idle and 1-2 W for one busy performance core "
                  "(published smartphone SoC power studies; approximate, varies widely by chip)",
    },
}


def active_watts(profile: Dict, busy_cores: int) -> float:
    """Board power while ``busy_cores`` cores run inference."""
    return profile["watts_idle"] + profile["watts_per_busy_core"] * min(busy_cores, profile["cores"])


def board_power(profile_name: str, watts_active: Optional[float], watts_idle: Optional[float],
                busy_cores: int) -> Tuple[float, str]:
    """The board's watts while inferring and the words that say where they came from: the user's
    ``--watts-active`` when given, else the device profile with ``busy_cores`` busy."""
    if watts_active is not None:
        text = f"--watts-active {watts_active} W" + (f", --watts-idle {watts_idle} W" if watts_idle is not None else "")
        return watts_active, text
    profile = PROFILES[profile_name]
    watts = active_watts(profile, busy_cores)
    return watts, (f"profile {profile_name}: {watts:.2f} W with {busy_cores} busy core(s); source: "
                   f"{profile['source']}; latency measured on this machine")


class EnergyMeter:
    """Joules between start() and stop() from RAPL (microjoule counters) or a battery (sampled watts)."""

    def __init__(self):
        self.rapl = [Path(p) for p in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj")
                     if Path(p).parent.name.count(":") == 1]
        self.batteries = [Path(p) for p in glob.glob("/sys/class/power_supply/*")
                          if (Path(p) / "type").is_file() and (Path(p) / "type").read_text().strip() == "Battery"]
        self.source = None
        self._start: Optional[list] = None
        self._samples: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read_rapl(self) -> Optional[list]:
        try:
            return [int(p.read_text()) for p in self.rapl]
        except (OSError, ValueError):
            return None

    def _battery_watts(self) -> Optional[float]:
        for bat in self.batteries:
            try:
                if (bat / "power_now").is_file():
                    return int((bat / "power_now").read_text()) / 1e6
                current = int((bat / "current_now").read_text()) / 1e6
                voltage = int((bat / "voltage_now").read_text()) / 1e6
                return current * voltage
            except (OSError, ValueError):
                continue
        return None

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = self._read_rapl() if self.rapl else None
        if self._start is not None:
            self.source = "rapl"
            return
        if self._battery_watts() is not None:
            self.source = "battery"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            watts = self._battery_watts()
            if watts is not None:
                self._samples.append(watts)

    def stop(self) -> Optional[float]:
        """Joules used since start(), or None when there is no meter."""
        elapsed = time.perf_counter() - self._t0
        if self.source == "rapl":
            end = self._read_rapl()
            if end is None:
                return None
            return sum((e - s) % (1 << 32) for s, e in zip(self._start, end)) / 1e6
        if self.source == "battery":
            self._stop.set()
            self._thread.join()
            return (sum(self._samples) / len(self._samples)) * elapsed if self._samples else None
        return None


def energy_report(seconds_per_cell: float, watts: float, cells_per_slide: int, battery_wh: Optional[float],
                  measured_joules_per_cell: Optional[float] = None, label: str = "estimated") -> Dict:
    """mJ per cell, cells per Wh, seconds and mJ per slide, slides per charge. Measured joules win over the
    estimate (watts x seconds per cell) when a meter gave them."""
    joules = measured_joules_per_cell if measured_joules_per_cell is not None else watts * seconds_per_cell
    slide_j = joules * cells_per_slide
    report = {
        "basis": label,
        "watts": {"value": watts, "unit": "W"},
        "energy_per_cell": {"value": joules * 1000.0, "unit": "mJ"},
        "cells_per_wh": {"value": 3600.0 / joules if joules else None, "unit": "cells/Wh"},
        "slide_seconds": {"value": seconds_per_cell * cells_per_slide, "unit": "s"},
        "slide_energy": {"value": slide_j * 1000.0, "unit": "mJ"},
        "cells_per_slide": cells_per_slide,
    }
    if battery_wh:
        report["battery_wh"] = {"value": battery_wh, "unit": "Wh"}
        report["slides_per_charge"] = {"value": battery_wh * 3600.0 / slide_j if slide_j else None, "unit": "slides"}
    return report
