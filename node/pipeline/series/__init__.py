"""DICOM files -> one series -> a HU :class:`~node.pipeline.volume.Volume`.

``find`` (group files by series, pick one), ``header`` (each header parsed once), ``load``
(``load_series``: the steps below in order), ``identity``, ``frames`` (image frames, localizers,
orientation, consistency), ``geometry`` (order, duplicates, tilt and uneven spacing, affine) and
``decode`` (transfer syntaxes, direct reads, parallel decoding).
"""
