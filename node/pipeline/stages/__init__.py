"""The steps of one run that :func:`node.pipeline.run.run_pipeline` chains, one per module.

``segment`` (the backend's masks), ``mesh`` (one tissue's files, two tissues at a time),
``seg`` (the DICOM SEG of the tissues), ``qc`` (pictures of the result for a person) and ``report``
(``report.json``).  Loading is
``node.pipeline.series``, the working grid ``Volume.downsampled``.
"""
