"""Surface meshes of tissue masks in patient coordinates (LPS mm), and their STL/PLY files.

``extract`` (mask -> mesh: flying edges, then ``smooth`` and ``decimate``), ``model``
(``MeshOptions``, ``Mesh``), ``geometry``, ``topology`` and ``coincident`` (float32 vertex
merging) for the checks, ``vtk_glue``, and ``files`` (STL/PLY writers, readers, on-disk check).
"""
