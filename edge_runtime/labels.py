"""Class names and what a file name or folder says about a cell (its true label, its patient)."""
from __future__ import annotations

import os
import re
from typing import Optional

PARASITIZED = "parasitized"
UNINFECTED = "uninfected"
REVIEW = "review"
CLASSES = (PARASITIZED, UNINFECTED)

# NIH names: C<patient> then P<slide>, BP<slide>, or the smear type (ThinF/thinF, NThinF/NthinF, _thinF, ...):
# C100P61ThinF_..., C37BP2_thinF_..., C7NthinF_..., C1_thinF_..., C59P20thinF_... (every name in the NIH set
# matches). A camera's C0001.jpg or C0001_0002.jpg does not: it would read as "patient 1".
_PATIENT_RE = re.compile(r"^C(\d+)(?:B?P\d|N?_?thin)", re.IGNORECASE)


def patient_id(path) -> Optional[str]:
    """The NIH patient id: the number after the leading ``C`` of an NIH cell file name (``C100P61ThinF_...`` ->
    ``"100"``), or None for any other name."""
    match = _PATIENT_RE.match(os.path.basename(os.path.normpath(path)))
    return str(int(match.group(1))) if match else None


def label_from_folder(path) -> Optional[str]:
    """The true label when the image's parent folder is named Parasitized or Uninfected (any case), else None."""
    parent = os.path.basename(os.path.dirname(os.path.normpath(path))).lower()
    return parent if parent in CLASSES else None
