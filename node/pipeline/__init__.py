"""The imaging pipeline: DICOM series -> HU volume -> tissue masks -> meshes and DICOM SEG."""
