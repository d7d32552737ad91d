"""Result objects beside the SEG, chosen per rule (``outputs:``).

* ``seg``: the DICOM SEG (:mod:`node.pipeline.seg`), as before; the default.
* ``sr``: measurements report, TID 1500 Comprehensive 3D SR (:mod:`.sr`).
* ``overlay``: the source slices with the tissues burned in, Secondary Capture (:mod:`.overlay`).
* ``stl``: each mesh as an Encapsulated STL instance (:mod:`.encapsulated_stl`).

:mod:`.options` names them (light: the rules import it); :func:`.write.write_outputs` writes them
from a run's volume, masks, profile, SEG and report.
"""

from node.pipeline.outputs.options import (
    DEFAULT_OUTPUTS,
    OUTPUT_KINDS,
    OVERLAY_MODES,
    OutputOptions,
    OverlayStyle,
    dicom_objects,
)

__all__ = ["DEFAULT_OUTPUTS", "OUTPUT_KINDS", "OVERLAY_MODES", "OutputOptions", "OverlayStyle", "dicom_objects"]
