"""DICOM segmentation node.

``node.pipeline`` turns a DICOM series into HU volumes, tissue masks, surface
meshes and a DICOM SEG; ``node.scp`` is the DICOM network side.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dicom-seg-node")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
