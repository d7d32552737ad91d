"""The model backends, each the library's own inference code called in-process.

``totalseg`` (TotalSegmentator), ``nnunet`` (nnU-Net v2), ``monai`` (MONAI bundles and
TorchScript models) and ``common`` (model folders, torch threads and device, the network
guard, label maps to tissue masks).  Nothing here is imported until a profile asks for it.
"""
