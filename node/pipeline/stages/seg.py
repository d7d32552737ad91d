"""The seg step: the tissue masks -> one DICOM SEG in the source study (one segment per tissue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset

from node import __version__
from node.backend_registry import backend_spec
from node.pipeline.seg import ALGORITHM_FAMILY_AI, ALGORITHM_FAMILY_THRESHOLD, SegmentSpec, write_seg
from node.pipeline.volume import Volume
from node.profiles import Profile

def segment_specs(profile: Profile, masks: dict[str, np.ndarray]) -> list[SegmentSpec]:
    """One SEG segment per tissue of ``profile``, in profile order."""
    specs = []
    for t in profile.result_tissues:
        specs.append(
            SegmentSpec(
                label=f"{profile.name} {t.name}",
                tissue=t.name,
                description=t.description,
                color=t.color,
                category=(t.category.value, t.category.scheme, t.category.meaning),
                type=(t.type.value, t.type.scheme, t.type.meaning),
                mask=masks[t.name],
            )
        )
    return specs


def write_tissue_seg(
    volume: Volume,
    profile: Profile,
    masks: dict[str, np.ndarray],
    path: Path,
    *,
    model_type: str,
    seg_series_uid: str | None,
) -> Dataset:
    """Write the SEG of ``masks`` to ``path``; returns it (its SeriesInstanceUID is
    ``seg_series_uid`` when given, else a new one)."""
    backend = backend_spec(model_type)
    ds = write_seg(
        volume,
        segment_specs(profile, masks),
        path,
        algorithm_name=backend.display_name,
        algorithm_version=__version__,
        algorithm_family=ALGORITHM_FAMILY_AI if backend.runs_model else ALGORITHM_FAMILY_THRESHOLD,
        series_instance_uid=seg_series_uid,
        series_description=f"SEG {profile.name} {volume.info.series_description}".strip()[:64],
    )
    return ds
