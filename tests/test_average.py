"""`fracture-node average`: sibling bundles' weights averaged into one network, refused across networks, and
refitted by the commands its card names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.models.bundle import load_bundle, read_card, save_bundle
from pipeline.training.average import FITTED_FIELDS
from pipeline.training.cli import average, recalibrate, train
from pipeline.training.toydata import write_toy_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy-average"), count=24, seed=5, negatives=4)


@pytest.fixture(scope="module")
def readers(toy: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny type readers started from the same detector with different seeds (no training step: their heads
    differ, their backbones are the detector's), each with a fitted card."""
    root = tmp_path_factory.mktemp("readers")
    out = []
    for seed in (1, 2):
        path = root / f"reader{seed}"
        result = CliRunner().invoke(train, [
            "--task", "classify", "--data", str(toy), "--out", str(path), "--long-side", "192", "--patch", "64",
            "--width", "4", "--batch-size", "4", "--max-steps", "0", "--checkpoint-dir", str(root / f"ckpt{seed}"),
            "--workers", "0", "--val-fraction", "0.25", "--seed", str(seed), "--weights-dtype", "float32",
            "--quiet", "--detector", str(model_dir / "detector")])
        assert result.exit_code == 0, result.output
        out.append(path)
    return out


def test_the_average_is_the_mean_of_every_tensor_and_its_card_names_the_ingredients(readers: list[Path], toy: Path,
                                                                                      tmp_path: Path) -> None:
    result = CliRunner().invoke(average, ["--bundle", str(readers[0]), "--bundle", str(readers[1]),
                                          "--out", str(tmp_path / "soup"), "--version", "9.9.0",
                                          "--weights-dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "refit it before use (fracture-node recalibrate" in result.output
    a, b = (load_bundle(p, expected_task="classify") for p in readers)
    soup = load_bundle(tmp_path / "soup", expected_task="classify")
    sa, sb, ss = a.model.state_dict(), b.model.state_dict(), soup.model.state_dict()
    differing = [k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sb[k])]
    assert differing, "the two ingredients should differ somewhere (their heads' seeds)"
    for key in sa:
        if sa[key].is_floating_point():
            torch.testing.assert_close(ss[key], (sa[key] + sb[key]) / 2)
        else:
            assert torch.equal(ss[key], torch.maximum(sa[key], sb[key]))
    card = soup.card
    assert card["version"] == "9.9.0" and card["name"] == a.card["name"]
    assert card["input"] == a.card["input"] and card["architecture"] == a.card["architecture"]
    assert not set(FITTED_FIELDS) & set(card), "a calibration fitted to other weights must not travel"
    assert soup.temperature == 1.0
    assert [i["sha256"] for i in card["training"]["averaged_from"]] == [a.identity.sha256, b.identity.sha256]
    assert [i["seed"] for i in card["training"]["averaged_from"]] == [1, 2]
    assert all(str(toy) in i["data"] for i in card["training"]["averaged_from"])
    # The recipe both share is kept; what differs (the seed, and so the split of the toy data) or belongs to one
    # run's calibration is not.
    assert card["training"]["learning_rate"] == a.card["training"]["learning_rate"]
    assert card["training"]["losses"] == a.card["training"]["losses"]
    assert a.card["training"]["data"] != b.card["training"]["data"]
    assert not {"seed", "data", "calibration_images"} & set(card["training"])
    assert card["training"]["calibration"].startswith("none: refit it before use")
    assert "not for diagnostic use" in card["disclaimer"].lower()


def test_the_average_is_refitted_by_the_command_its_card_names(readers: list[Path], toy: Path, model_dir: Path,
                                                               tmp_path: Path) -> None:
    soup = tmp_path / "soup"
    made = CliRunner().invoke(average, ["--bundle", str(readers[0]), "--bundle", str(readers[1]),
                                        "--out", str(soup)])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(recalibrate, ["--classifier", str(soup), "--detector", str(model_dir / "detector"),
                                              "--data", str(toy), "--out", str(tmp_path / "fitted"), "--quiet"])
    assert result.exit_code == 0, result.output
    fitted = read_card(tmp_path / "fitted")
    assert fitted["temperature"] > 0 and "validation" in fitted["metrics"]
    assert fitted["weights"]["sha256"] == read_card(soup)["weights"]["sha256"]
    assert len(fitted["training"]["averaged_from"]) == 2


def test_only_bundles_of_one_network_are_averaged(readers: list[Path], model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for bundles, message in [
        ([readers[0]], "two bundles or more"),
        ([readers[0], model_dir / "detector"], "differs from"),
        ([model_dir / "validity", model_dir / "validity"], "averaging is for the detector and the type reader"),
    ]:
        result = runner.invoke(average, [*[a for p in bundles for a in ("--bundle", str(p))],
                                         "--out", str(tmp_path / "no")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "no").exists()


def test_averaged_detectors_are_refitted_by_the_command_their_card_names(toy: Path, model_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Two detectors (the tiny one and a perturbed twin) averaged, then the Platt refit the card names: no training
    step, so the refitted backbone is the average's, with a fitted temperature and operating point."""
    detector = load_bundle(model_dir / "detector", expected_task="detect")
    twin = copy.deepcopy(detector.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    save_bundle(twin, {k: v for k, v in detector.card.items() if k != "weights"}, tmp_path / "twin",
                dtype="float32")
    made = CliRunner().invoke(average, ["--bundle", str(model_dir / "detector"), "--bundle", str(tmp_path / "twin"),
                                        "--out", str(tmp_path / "soup"), "--weights-dtype", "float32"])
    assert made.exit_code == 0, made.output
    assert "fracture-node train --task fracture --init OUT --max-steps 0 --head-images 0" in made.output
    soup = load_bundle(tmp_path / "soup", expected_task="detect")
    assert "operating_point" not in soup.card and soup.operating_point == 0.5
    refit = CliRunner().invoke(train, [
        "--task", "fracture", "--init", str(tmp_path / "soup"), "--max-steps", "0", "--head-images", "0",
        "--data", str(toy), "--calibration-data", str(toy), "--out", str(tmp_path / "fitted"),
        "--long-side", str(soup.input_spec["long_side"]), "--crop", "64", "--width", "4", "--batch-size", "4",
        "--workers", "0", "--checkpoint-dir", str(tmp_path / "ckpt"), "--weights-dtype", "float32", "--quiet"])
    assert refit.exit_code == 0, refit.output
    fitted = load_bundle(tmp_path / "fitted" / "detector", expected_task="detect")
    # Fitted on the calibration images (the tiny network's figures are degenerate; that they were fitted is the point).
    assert fitted.card["training"]["calibration_images"] == 24 and "temperature" in fitted.card
    assert {"threshold", "indeterminate_band"} <= set(fitted.card["operating_point"])
    assert fitted.card["training"]["calibration"].startswith("Platt scaling on the calibration images")
    # The detector's card names the weights it started from, as the reader's does (an average's lineage reads it).
    assert fitted.card["training"]["initialised_from"] == str(tmp_path / "soup")
    backbone = [k for k in soup.model.state_dict() if k.startswith("stem")]
    assert backbone
    for key in backbone:
        torch.testing.assert_close(fitted.model.state_dict()[key], soup.model.state_dict()[key])
