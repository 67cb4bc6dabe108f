"""Class names and what a file name or folder says about a cell (its true label, its patient)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

PARASITIZED = "parasitized"
UNINFECTED = "uninfected"
REVIEW = "review"
CLASSES = (PARASITIZED, UNINFECTED)

_PATIENT_RE = re.compile(r"^C(\d+)", re.IGNORECASE)


def patient_id(path) -> Optional[str]:
    """The NIH patient id: the number after the leading ``C`` of the file name (``C100P61ThinF_...`` -> ``"100"``)."""
    match = _PATIENT_RE.match(Path(path).name)
    return str(int(match.group(1))) if match else None


def label_from_folder(path) -> Optional[str]:
    """The true label when the image's parent folder is named Parasitized or Uninfected (any case), else None."""
    parent = Path(path).parent.name.lower()
    return parent if parent in CLASSES else None
