"""Where the TFLite metadata reader used to live; it moved with the bundle writer to
:mod:`malaria_edge.export.metadata`. Kept so existing callers of ``malaria_edge.quantize.metadata.read_metadata``
keep working until they import it from there."""
from malaria_edge.export.metadata import read_metadata

__all__ = ["read_metadata"]
