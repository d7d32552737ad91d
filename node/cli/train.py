"""``dicom-node train nnunet``: nnU-Net's plan/preprocess/train on an exported dataset, result registered
as a profile's model.

The first paragraph above is the command's ``--help`` description; examples: docs/ai-backends.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune / train segmentation models")
    ps = p.add_subparsers(dest="framework", metavar="FRAMEWORK", required=True)
    nn = ps.add_parser("nnunet", help="train nnU-Net v2 (3d_fullres) on an exported dataset",
                       description=__doc__.split("\n\n")[0])
    nn.add_argument("--dataset", required=True, type=Path, help="raw dataset folder Dataset<ID>_<NAME>")
    nn.add_argument("--work", required=True, type=Path, help="nnU-Net work folder (raw/preprocessed/results)")
    nn.add_argument("--fold", default="0", help="fold 0..4 or 'all' (default 0)")
    nn.add_argument("--trainer", default=None, help="nnU-Net trainer class (default nnUNetTrainer; TinyTrainer with --tiny)")
    nn.add_argument("--tiny", action="store_true", help="tiny network and short schedule (CPU tests)")
    nn.add_argument("--epochs", type=int, default=None)
    nn.add_argument("--iterations", type=int, default=None, help="iterations per epoch (TinyTrainer)")
    nn.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    nn.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    nn.add_argument("--models-root", type=Path, default=None, help="where the trained model is copied "
                    "(default: DICOM_NODE_MODELS or <repo>/models)")
    nn.add_argument("--profile", type=Path, default=None,
                    help="profile YAML to register the model in (model.folder is set; created when missing, "
                    "with one tissue per dataset label)")
    nn.set_defaults(func=_nnunet)


def _nnunet(args: argparse.Namespace) -> int:
    from node.errors import InputError

    ds = args.dataset.resolve()
    if not (ds / "dataset.json").is_file() or not ds.name.startswith("Dataset"):
        raise InputError("not an nnU-Net raw dataset folder (Dataset<ID>_<NAME>/dataset.json)", path=ds)
    dataset_id = int(ds.name[7:10])

    from node.training.nnunet import set_nnunet_dirs

    dirs = set_nnunet_dirs(args.work)  # before nnunetv2 is imported
    raw = dirs["nnUNet_raw"] / ds.name
    if raw.resolve() != ds:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.copytree(ds, raw)

    from node.pipeline.ai import common as ai_common
    from node.training.nnunet import export_model, plan_and_preprocess, train

    ai_common.prepare_torch(args.threads)
    trainer = args.trainer or ("TinyTrainer" if args.tiny else "nnUNetTrainer")
    print(f"planning and preprocessing {ds.name} ...", flush=True)
    plan_and_preprocess(dataset_id, tiny=args.tiny, processes=max(1, args.threads))
    fold = args.fold if args.fold == "all" else int(args.fold)
    print(f"training {trainer} fold {fold} on {args.device} ...", flush=True)
    out = train(dataset_id, fold=fold, trainer=trainer, epochs=args.epochs, iterations=args.iterations,
                device=args.device, threads=args.threads)
    if args.models_root:
        ai_common.configure(models_root=args.models_root)
    rel = Path(ds.name) / out.name
    dest = export_model(out, ai_common.models_root() / rel, folds=(fold,))
    print(f"model: {dest}")
    if args.profile:
        _register(args.profile, rel, fold, dest)
        print(f"profile: {args.profile} (model.folder = {rel})")
    return 0


def _register(profile_path: Path, rel: Path, fold: int | str, model_dir: Path) -> None:
    import json

    import yaml

    from node.profiles import load_profile_file

    if profile_path.exists():
        data = yaml.safe_load(profile_path.read_text()) or {}
    else:
        labels = json.loads((model_dir / "dataset.json").read_text())["labels"]
        palette = [(230, 80, 80), (80, 180, 80), (80, 120, 230), (230, 200, 60), (180, 80, 200)]
        data = {
            "name": profile_path.stem,
            "description": f"nnU-Net model {rel.parts[0]} (registered by dicom-node train nnunet)",
            "model_type": "nnunet",
            "modality": "CT",
            "tissues": [
                {"name": name.lower(), "description": f"{name} (nnU-Net label {i})",
                 "color": list(palette[(i - 1) % len(palette)]), "structures": [name],
                 "category": {"value": "123037004", "meaning": "Anatomical Structure"},
                 "type": {"value": "91723000", "meaning": "Anatomical Structure"}}
                for name, i in labels.items() if name != "background" and isinstance(i, int)
            ],
        }
    model = dict(data.get("model") or {})
    model.update({"folder": str(rel), "configuration": "3d_fullres", "folds": [fold]})
    data["model"] = model
    data["model_type"] = "nnunet"
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = profile_path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    load_profile_file(tmp.rename(profile_path))  # validate what was written
