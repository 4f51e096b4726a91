"""Model bundles: save/verify/load round trip, refusal of corrupted or off-contract bundles, networks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models.bundle import BundleError, load_bundle, make_card, save_bundle, sha256_file
from pipeline.models.nets import FractureNet, ValidityNet
from pipeline.run import BUNDLED_MODEL_DIR
from pipeline.taxonomy import FRACTURE_TYPES


@pytest.fixture
def net() -> FractureNet:
    torch.manual_seed(0)
    return FractureNet(width=8).eval()


@pytest.fixture
def bundle_dir(tmp_path: Path, net: FractureNet) -> Path:
    card = make_card(name="t", task="classify", architecture="FractureNet", config=dict(net.config),
                     input_spec={"long_side": 128}, temperature=1.3)
    return save_bundle(net, card, tmp_path / "classifier")


def test_fracture_net_shapes(net: FractureNet) -> None:
    out = net(torch.randn(2, 1, 128, 96))
    assert out.detect.shape == (2,)
    assert out.types.shape == (2, len(FRACTURE_TYPES))
    assert out.seg.shape == (2, 1, 16, 12)  # 1/8 of the input
    assert out.features.shape[-2:] == (16, 12)


def test_validity_net_shape() -> None:
    assert ValidityNet().eval()(torch.randn(3, 1, 160, 160)).shape == (3,)


def test_round_trip_same_outputs(bundle_dir: Path, net: FractureNet) -> None:
    card = json.loads((bundle_dir / "model.json").read_text())
    assert card["weights"]["sha256"] == sha256_file(bundle_dir / "weights.safetensors")
    assert card["classes"] == list(FRACTURE_TYPES)
    assert "not for diagnostic use" in card["intended_use"].lower()
    loaded = load_bundle(bundle_dir, expected_task="classify")
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        a, b = net(x), loaded.model(x)
    assert torch.allclose(a.types, b.types) and torch.allclose(a.detect, b.detect)
    assert loaded.identity.sha256 == card["weights"]["sha256"]
    assert loaded.temperature == pytest.approx(1.3)


def test_float16_weights_are_close(tmp_path: Path, net: FractureNet) -> None:
    card = make_card(name="t", task="detect", architecture="FractureNet", config=dict(net.config), input_spec={})
    loaded = load_bundle(save_bundle(net, card, tmp_path / "d", dtype="float16"))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x).detect, loaded.model(x).detect, atol=5e-2)


def test_corrupted_weights_refused(bundle_dir: Path) -> None:
    weights = bundle_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 .* does not match"):
        load_bundle(bundle_dir)


def test_classes_must_match_taxonomy(bundle_dir: Path) -> None:
    card_path = bundle_dir / "model.json"
    card = json.loads(card_path.read_text())
    card["classes"] = list(reversed(card["classes"]))
    card_path.write_text(json.dumps(card))
    with pytest.raises(BundleError, match="differ from the taxonomy"):
        load_bundle(bundle_dir)


def test_missing_card_and_weights(tmp_path: Path, bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="model card missing"):
        load_bundle(tmp_path / "nothing")
    (bundle_dir / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="weights file missing"):
        load_bundle(bundle_dir)


def test_wrong_task_refused(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="expected 'detect'"):
        load_bundle(bundle_dir, expected_task="detect")


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "detector" / "model.json").exists(), reason="no bundled models")
@pytest.mark.parametrize("name", ["validity", "detector", "classifier"])
def test_bundled_models_verify(name: str) -> None:
    bundle = load_bundle(BUNDLED_MODEL_DIR / name)
    card = bundle.card
    assert card["disclaimer"] == "Research use only. Not for diagnostic use."
    assert (BUNDLED_MODEL_DIR / name / "weights.safetensors").stat().st_size < 5_000_000
    for key in ("name", "version", "task", "classes", "input", "training", "metrics", "temperature"):
        assert key in card
    if name == "detector":
        assert 0 < card["operating_point"]["threshold"] < 1
        lo, hi = card["operating_point"]["indeterminate_band"]
        assert lo <= card["operating_point"]["threshold"] <= hi


def test_cached_sha256_is_taken_again_when_the_file_changes(tmp_path: Path) -> None:
    """The probes' cached digest (``/readyz``, ``/api/v1/models``) follows a rewritten file: same size, new
    bytes, new modification time."""
    import os

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"A" * 4096)
    first = sha256_file(weights, cached=True)
    assert first == sha256_file(weights) == sha256_file(weights, cached=True)
    stat = weights.stat()
    weights.write_bytes(b"B" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert sha256_file(weights, cached=True) == sha256_file(weights) != first
