"""A detector widened by `train --init NARROW --width W`: it computes what the narrow one computed, its copied
channels part ways in training, its card says so, and narrowing is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.models.bundle import load_bundle
from pipeline.models.nets import FractureNet, ResBlock
from pipeline.training.cli import train
from pipeline.training.toydata import write_toy_dataset
from pipeline.training.widen import widen_fracture_state


def _trained_looking(width: int, seed: int) -> FractureNet:
    """A FractureNet with random weights and random batch-norm statistics and affine terms, in evaluation mode
    (fresh batch norms are the identity, which would hide a wrongly copied statistic)."""
    torch.manual_seed(seed)
    net = FractureNet(width=width)
    for name, tensor in net.state_dict().items():
        if name.endswith("running_mean"):
            tensor.normal_(0, 0.3)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return net.eval()


@pytest.mark.parametrize("new_width", [6, 8, 13])
def test_the_widened_network_computes_what_the_narrow_one_computed(new_width: int) -> None:
    narrow = _trained_looking(4, seed=3)
    wide = FractureNet(width=new_width)
    wide.load_state_dict(widen_fracture_state(narrow.state_dict(), new_width, seed=1), strict=True)
    wide.eval()
    x = torch.randn(2, 1, 96, 128)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert b.features.shape[1] == 3 * new_width
    torch.testing.assert_close(b.detect, a.detect, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.seg, a.seg, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.types, a.types, rtol=1e-4, atol=1e-4)


def test_copied_channels_part_ways_when_training_continues() -> None:
    narrow = _trained_looking(4, seed=4)
    wide = FractureNet(width=6)
    wide.load_state_dict(widen_fracture_state(narrow.state_dict(), 6, seed=2))
    # Stage 2's output has 8 channels widened to 12: channels 8-11 are copies of four of the first eight.
    wide.train()
    out = wide(torch.randn(2, 1, 96, 96))
    (out.detect.sum() + out.seg.mean()).backward()
    torch.optim.SGD(wide.parameters(), lr=0.1).step()
    block = wide.stage2[1]
    assert isinstance(block, ResBlock)
    conv = block.conv2.weight.detach()  # rows are stage 2's output channels
    copies = list(range(8, 12))
    originals = [int(torch.argmin((conv[:8] - conv[j]).flatten(1).abs().sum(1))) for j in copies]
    # Each copy starts with its original's incoming weights; the split of what reads them differs, so after one
    # step the two rows differ.
    assert all(not torch.allclose(conv[j], conv[o]) for j, o in zip(copies, originals, strict=True))


def test_narrowing_is_refused() -> None:
    with pytest.raises(ValueError, match="narrowing"):
        widen_fracture_state(_trained_looking(6, seed=5).state_dict(), 4)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy-widen"), count=16, seed=7, negatives=2)


def _train(args: list[str], tmp: Path, toy: Path, name: str) -> tuple[int, str]:
    result = CliRunner().invoke(train, [
        "--task", "fracture", "--data", str(toy), "--calibration-data", str(toy), "--out", str(tmp / name),
        "--long-side", "128", "--crop", "64", "--batch-size", "4", "--workers", "0", "--head-images", "0",
        "--val-fraction", "0.25",
        "--checkpoint-dir", str(tmp / f"ckpt-{name}"), "--weights-dtype", "float32", "--quiet", *args])
    return result.exit_code, result.output


def test_train_widens_its_init_and_says_so_and_a_refit_keeps_the_width(toy: Path, tmp_path: Path) -> None:
    code, output = _train(["--width", "4", "--max-steps", "2"], tmp_path, toy, "narrow")
    assert code == 0, output
    narrow = tmp_path / "narrow" / "detector"
    code, output = _train(["--init", str(narrow), "--width", "6", "--max-steps", "0", "--seed", "3"],
                          tmp_path, toy, "wide")
    assert code == 0, output
    a = load_bundle(narrow, expected_task="detect")
    b = load_bundle(tmp_path / "wide" / "detector", expected_task="detect")
    assert b.card["architecture"]["config"]["width"] == 6
    widened = b.card["training"]["widened"]
    assert (widened["from_width"], widened["to_width"], widened["seed"]) == (4, 6, 3)
    assert b.card["training"]["initialised_from"] == str(narrow)
    # No training step: the wide network's raw detection logit is the narrow one's (the calibration refit moves
    # the bias by the same Platt shift for both, fitted on the same images, so compare the un-biased features).
    x = torch.randn(1, 1, 128, 96)
    with torch.no_grad():
        fa, fb = a.model.backbone(x), b.model.backbone(x)
        sa, sb = a.model.seg_head(fa), b.model.seg_head(fb)
    torch.testing.assert_close(sb, sa, rtol=1e-4, atol=1e-4)
    # A refit of the wide bundle without --width keeps its width rather than starting a fresh width-16 network.
    code, output = _train(["--init", str(tmp_path / "wide" / "detector"), "--max-steps", "0"], tmp_path, toy, "refit")
    assert code == 0, output
    refit = load_bundle(tmp_path / "refit" / "detector", expected_task="detect")
    assert refit.card["architecture"]["config"]["width"] == 6 and "widened" not in refit.card["training"]
    # Starting a narrower network from it is refused with a message, not trained from scratch.
    code, output = _train(["--init", str(tmp_path / "wide" / "detector"), "--width", "4", "--max-steps", "0"],
                          tmp_path, toy, "narrowed")
    assert code != 0 and "width-6 network and this one is width 4" in output
    assert "would throw its training away" in output


def test_a_type_reader_of_another_width_than_its_detector_is_refused(toy: Path, model_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The reader's backbone starts from the detector's; at another width every tensor would start fresh."""
    result = CliRunner().invoke(train, [
        "--task", "classify", "--data", str(toy), "--out", str(tmp_path / "reader"), "--long-side", "128",
        "--patch", "64", "--width", "6", "--batch-size", "4", "--max-steps", "0", "--workers", "0",
        "--val-fraction", "0.25", "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet",
        "--detector", str(model_dir / "detector")])
    assert result.exit_code != 0
    assert "width-4 network and this one is width 6" in result.output
    assert "only a detector is widened" in result.output
