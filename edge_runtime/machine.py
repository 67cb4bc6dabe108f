"""What machine a figure was measured on: CPU model, cores, OS, Python."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Dict


def machine_info() -> Dict:
    """CPU model, cores, OS and Python: every timing we report says where it ran."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(), "python": platform.python_version()}
