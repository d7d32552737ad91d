"""The backend registry (node/backend_registry.py) is the one place backends are named: the
profile schema, the rule validator, the pipeline's loader, the SEG's algorithm identification
and the pool's slot choice derive from it."""

from __future__ import annotations

import importlib.util
import sqlite3
from typing import Any

import numpy as np
import pytest

from node import backend_registry
from node.backend_registry import BACKEND_NAMES, BACKENDS, DEFAULT_BACKEND, MODEL_BACKEND_NAMES, backend_spec
from node.contracts import Resource
from node.errors import BackendUnavailable, ProfileError
from node.pipeline.backends import StreamingBackend, get_backend, is_streaming
from node.pipeline.hu.backend import HUBackend
from node.pipeline.volume import Volume
from node.profiles import Profile
from node.profiles import MODEL_SECTIONS, parse_profile
from node.routing.rules import parse_rules
from node.store import InstanceRecord, Store


def _hu_profile(model_type: str) -> dict:
    return {"name": "p", "description": "d", "model_type": model_type,
            "tissues": [{"name": "t", "description": "d", "color": [1, 2, 3], "hu": [100, 200],
                         "category": {"value": "91723000", "meaning": "Anatomical Structure"},
                         "type": {"value": "272673000", "meaning": "Bone"}}]}


def test_every_backend_loads_its_class_or_says_how_to_install_it():
    for spec in BACKENDS:
        try:
            backend = get_backend(spec.name)
        except BackendUnavailable as exc:  # an AI extra not installed here
            assert spec.extra and f".[{spec.extra}]" in str(exc)
            continue
        assert type(backend).__name__ == spec.class_name
        assert type(backend).__module__ == spec.module
        assert isinstance(backend.run_info(), dict)


class _AllAtOnce:
    """A backend that returns its masks together (as the model backends do)."""

    def segment(self, volume: Volume, profile: Profile, *, phase: str) -> dict[str, np.ndarray]:
        return {}

    def run_info(self) -> dict[str, Any]:
        return {}


def test_only_a_streaming_backend_is_handed_each_mask() -> None:
    hu: StreamingBackend = HUBackend()  # mypy checks the class against the protocol
    assert is_streaming(hu)
    assert not is_streaming(_AllAtOnce())


def test_unknown_backend_is_refused_with_the_registry_names():
    with pytest.raises(ProfileError, match="model_type 'deeplearn' is not allowed; allowed: " + ", ".join(BACKEND_NAMES)):
        get_backend("deeplearn")
    with pytest.raises(ProfileError, match="deeplearn"):
        backend_spec("deeplearn")
    assert not backend_registry.runs_model("deeplearn")


def test_profile_schema_accepts_exactly_the_registry(monkeypatch):
    assert parse_profile(_hu_profile(DEFAULT_BACKEND), "test").model_type == DEFAULT_BACKEND
    with pytest.raises(ProfileError, match="model_type: 'x' is not allowed; allowed: 'hu_based', 'totalsegmentator', "
                                           "'monai' or 'nnunet'"):
        parse_profile(_hu_profile("x"), "test")
    # every backend that runs a model has a typed model: section, and no other backend has one
    assert set(MODEL_SECTIONS) == set(MODEL_BACKEND_NAMES)
    # a backend added to the registry is a valid model_type without touching the profile schema
    extra = backend_registry.BackendSpec("plain2", "Plain 2", runs_model=False, extra=None,
                                         module="node.pipeline.hu.backend", class_name="HUBackend")
    monkeypatch.setattr(backend_registry, "BACKEND_NAMES", (*BACKEND_NAMES, "plain2"))
    monkeypatch.setattr(backend_registry, "_BY_NAME", {**backend_registry._BY_NAME, "plain2": extra})
    import node.profiles as profiles

    monkeypatch.setattr(profiles, "BACKEND_NAMES", backend_registry.BACKEND_NAMES)
    assert parse_profile(_hu_profile("plain2"), "test").model_type == "plain2"


def test_rule_backend_is_checked_against_the_registry():
    ok = parse_rules("rules:\n  - {name: a, match: {Modality: CT}, profile: bones, backend: nnunet}\n")
    assert ok.rules[0].backend == "nnunet"
    with pytest.raises(Exception, match=r"unknown backend 'nnunett' \(did you mean 'nnunet'\?\); allowed: "
                                        + ", ".join(BACKEND_NAMES)):
        parse_rules("rules:\n  - {name: a, match: {Modality: CT}, profile: bones, backend: nnunett}\n")


def test_seg_algorithm_identification_comes_from_the_registry():
    assert backend_spec("hu_based").display_name == "dicom-node HU threshold"  # what the SEG has said so far
    assert [b.name for b in BACKENDS if b.runs_model] == list(MODEL_BACKEND_NAMES) == ["totalsegmentator", "monai",
                                                                                       "nnunet"]
    for spec in BACKENDS:
        importlib.util.find_spec(spec.module.rsplit(".", 1)[0])  # the package exists


def test_unclassified_job_is_only_claimed_by_a_claim_for_any_kind(tmp_path):
    """The store knows no backends: a row without a slot kind waits for the pool's classification."""
    store = Store(tmp_path / "node.db")
    store.record_instance(InstanceRecord("1.1", "1.2.840.10008.5.1.4.1.1.2", "9.9", "9", "/x", "1.2", 1))
    job = store.create_job("9.9", "r", profile="p", backend="nnunet", rules_version="v", generation=1)[0]
    assert store.claim_job("w", kinds=(Resource.GPU,)) is None and store.claim_job("w", kinds=(Resource.CPU,)) is None
    assert (claimed := store.claim_job("w")) is not None and claimed.id == job
    store.close()
    with sqlite3.connect(tmp_path / "node.db") as c:
        assert "nnunet" not in " ".join(r[0] or "" for r in c.execute("SELECT sql FROM sqlite_master"))
