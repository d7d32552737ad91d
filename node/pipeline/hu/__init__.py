"""The HU-threshold backend and what only it uses.

``backend`` (``HUBackend``: thresholds and profile steps per tissue), ``body`` (the body
mask), ``morphology`` (sizes in mm on anisotropic grids), ``refine`` (local half-maximum
edges) and ``heap`` (the glibc heap policy of the process that runs this backend).
"""
