"""nnU-Net v2 planning, preprocessing and training, driven from the node, with nnU-Net's own code.

:class:`TinyTrainer` (short schedule, no mirroring) makes the tiny test models; on a GPU the
real ``nnUNetTrainer`` runs unchanged.  The final checkpoint is slimmed so that inference needs
nothing from this module (:func:`slim_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

_DIR_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def set_nnunet_dirs(work: str | Path) -> dict[str, Path]:
    """Point nnU-Net's three folders into ``work`` (``nnUNet_raw``, ``nnUNet_preprocessed``,
    ``nnUNet_results`` in the environment).  nnunetv2 >= 2.6 reads them lazily; call this before
    the first ``import nnunetv2`` anyway, for older releases that bound them at import time."""
    w = Path(work).resolve()
    out = {k: w / k.split("_", 1)[1] for k in _DIR_KEYS}
    for k, v in out.items():
        v.mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(v)
    return out


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def write_case_nifti(path: Path, array_kji: np.ndarray, spacing_ijk: Iterable[float],
                     origin: Iterable[float] = (0.0, 0.0, 0.0), direction: np.ndarray | None = None) -> None:
    """Write ``[k, j, i]`` data as NIfTI through SimpleITK (the reader nnU-Net plans use)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    img.SetSpacing([float(s) for s in spacing_ijk])
    img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(x) for x in np.asarray(direction, float).ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_dataset_json(folder: Path, labels: dict[str, int], n_train: int, channel: str = "CT",
                       input_orientation: str = "LPS") -> None:
    """nnU-Net's ``dataset.json``, with the storage orientation of the images (axis codes, see
    :mod:`node.pipeline.orientation`): nnU-Net copies it into the trained model folder, where the
    node's nnU-Net backend reads it."""
    data = {
        "channel_names": {"0": channel},
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "input_orientation": input_orientation,
    }
    (folder / "dataset.json").write_text(json.dumps(data, indent=2) + "\n")


class _TinyPlans:
    """Shrink the planned ``3d_fullres`` network: small features (12/24/48), 32^3 patches, 3 stages."""

    @staticmethod
    def apply(plans: dict, patch: int = 32, features: tuple[int, ...] = (12, 24, 48), batch_size: int = 2) -> dict:
        cfg = plans["configurations"]["3d_fullres"]
        cfg["patch_size"] = [patch] * 3
        cfg["batch_size"] = batch_size
        arch = cfg["architecture"]["arch_kwargs"]
        n = len(features)
        arch["n_stages"] = n
        arch["features_per_stage"] = list(features)
        arch["kernel_sizes"] = [[3, 3, 3]] * n
        arch["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
        arch["n_conv_per_stage"] = [1] * n
        arch["n_conv_per_stage_decoder"] = [1] * (n - 1)
        return plans


def plan_and_preprocess(dataset_id: int, *, tiny: bool = False, processes: int = 1) -> dict:
    """nnU-Net's fingerprint, planning and ``3d_fullres`` preprocessing; returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True, clean=True,
                         verbose=False)
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must be >= 1 there
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        plan_experiments([dataset_id])
    finally:
        if old is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = old
        import torch

        torch.set_num_threads(1)
    name = convert_id_to_dataset_name(dataset_id)
    plans_file = Path(nnUNet_preprocessed) / name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    if tiny:
        plans = _TinyPlans.apply(plans)
        plans_file.write_text(json.dumps(plans, indent=2))
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(processes,), verbose=False)
    return plans


def _trainer_classes() -> dict[str, type[Any]]:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class TinyTrainer(nnUNetTrainer):
        """nnUNetTrainer with a short schedule (``epochs`` x ``iterations``), Adam, no mirroring."""

        epochs = 20
        iterations = 25
        val_iterations = 3

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            # nnUNetTrainer records its init arguments by name (locals()), so keep the signature
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = self.epochs
            self.num_iterations_per_epoch = self.iterations
            self.num_val_iterations_per_epoch = self.val_iterations
            self.initial_lr = 3e-3
            self.save_every = 10 ** 6  # only the final checkpoint

        def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
            # nnU-Net's SGD (momentum 0.99) needs far more than 500 iterations; with a tiny network
            # and a short schedule it stayed at "all background".  Adam + poly decay converges.
            from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

            opt = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
            return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(
            self,
        ) -> tuple[tuple[float, float], bool, np.ndarray, None]:
            rot, dummy2d, initial, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None
            return rot, dummy2d, initial, None

    return {"TinyTrainer": TinyTrainer, "nnUNetTrainer": nnUNetTrainer}


def slim_checkpoint(path: Path, trainer_name: str = "nnUNetTrainer") -> None:
    """Drop optimizer/scaler state and set ``trainer_name`` to a class nnU-Net finds by name
    (not :class:`TinyTrainer`), so inference needs nothing from this module."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for k in ("optimizer_state", "grad_scaler_state"):
        ckpt[k] = None
    ckpt["trainer_name"] = trainer_name
    ckpt["network_weights"] = {k: v.detach().clone().contiguous() for k, v in ckpt["network_weights"].items()}
    torch.save(ckpt, path)


def train(dataset_id: int, *, fold: int | str = 0, trainer: str = "TinyTrainer", epochs: int | None = None,
          iterations: int | None = None, device: str = "auto", threads: int = 1, seed: int = 0) -> Path:
    """Train ``3d_fullres`` for ``dataset_id``; returns the trainer output folder (holding ``fold_N``)."""
    import torch

    from node.pipeline.ai import common as ai_common

    ai_common.prepare_torch(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random

    random.seed(seed)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    classes = _trainer_classes()
    if trainer in classes:
        cls = classes[trainer]
    else:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        cls = recursive_find_trainer_class_by_name(trainer)
    if trainer == "TinyTrainer":
        cls = type("TinyTrainer", (cls,), {"epochs": epochs or cls.epochs, "iterations": iterations or cls.iterations})
    n_epochs = epochs
    name = convert_id_to_dataset_name(dataset_id)
    pre = Path(nnUNet_preprocessed) / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnUNetTrainer pops it (set by nnU-Net's run_training)
    dataset_json = json.loads((pre / "dataset.json").read_text())
    dev = ai_common.select_device(device)
    t = cls(plans=plans, configuration="3d_fullres", fold=fold, dataset_json=dataset_json, device=dev)
    if trainer != "TinyTrainer" and n_epochs:
        t.num_epochs = n_epochs
    t0 = time.perf_counter()
    t.run_training()
    out = Path(t.output_folder)
    ckpt = out / "checkpoint_final.pth"
    base_name = "nnUNetTrainer" if trainer == "TinyTrainer" else trainer
    slim_checkpoint(ckpt, base_name)
    (out / "checkpoint_best.pth").unlink(missing_ok=True)
    (out / "training_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return Path(t.output_folder_base)


def export_model(trainer_folder: Path, dest: Path, folds: Iterable[int | str] = (0,)) -> Path:
    """Copy what inference needs (dataset.json, plans.json, fold_N/checkpoint_final.pth) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("dataset.json", "plans.json"):
        shutil.copy2(trainer_folder / f, dest / f)
    for fold in folds:
        (dest / f"fold_{fold}").mkdir(exist_ok=True)
        shutil.copy2(trainer_folder / f"fold_{fold}" / "checkpoint_final.pth", dest / f"fold_{fold}" / "checkpoint_final.pth")
    return dest
