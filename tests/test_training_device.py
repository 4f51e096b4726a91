"""Where training runs: ``--device`` (the CPU here; a CUDA GPU where torch sees one).

The CPU tests run everywhere. The CUDA tests run only where torch sees a GPU (a lent machine, a hospital's
server); they train the same tiny networks there and check what a CPU run checks, plus that what was trained on
the GPU loads, resumes and scores on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.models.bundle import load_bundle
from pipeline.training.cli import train
from pipeline.training.device import DeviceError, describe_device, model_device, resolve_device, to_device
from pipeline.training.toydata import write_toy_dataset

HAS_CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU on this machine")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy-device"), count=24, seed=5, negatives=8)


def _fracture_args(toy: Path, out: Path, ckpt: Path, epochs: int, device: str) -> list[str]:
    return ["--task", "fracture", "--data", str(toy), "--epochs", str(epochs), "--out", str(out),
            "--long-side", "96", "--crop", "64", "--width", "8", "--batch-size", "8", "--lr", "3e-3",
            "--checkpoint-dir", str(ckpt), "--workers", "0", "--val-fraction", "0.2", "--seed", "2",
            "--weights-dtype", "float32", "--head-images", "16", "--device", device, "--quiet"]


def _history(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]


def test_cpu_and_auto_resolve_and_unknown_devices_are_refused() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu"))
    for bad in ("tpu", "cuda:x", "gpu", ""):
        with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    described = describe_device(torch.device("cpu"))
    assert described["type"] == "cpu" and described["torch"] == torch.__version__ and described["threads"] >= 1


@no_cuda
def test_cuda_without_a_gpu_says_so_and_what_to_do() -> None:
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(DeviceError, match=r"--device cpu") as caught:
            resolve_device(name)
        assert torch.__version__ in str(caught.value)


@no_cuda
def test_train_with_cuda_on_a_machine_without_one_is_refused_before_it_starts(toy: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    result = CliRunner().invoke(train, _fracture_args(toy, tmp_path / "out", ckpt, 1, "cuda"))
    assert result.exit_code != 0
    assert "device 'cuda'" in result.output and "--device cpu" in result.output
    assert not ckpt.exists() and not (tmp_path / "out").exists()


@needs_cuda
def test_a_gpu_number_beyond_those_there_is_refused() -> None:
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(DeviceError, match=f"sees {count} GPU"):
        resolve_device(f"cuda:{count}")


def test_to_device_and_model_device_on_the_cpu() -> None:
    batch = {"x": torch.ones(2, 1, 4, 4), "type": torch.tensor([1, -1])}
    moved = to_device(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys() and all(moved[k] is batch[k] for k in batch)  # nothing copied
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters


# ------------------------------------------------------------------------- the same runs on each device
# Each test below runs on the CPU everywhere and again on the GPU where there is one, so a GPU-only failure
# shows as the one variant failing.

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]


def _same_outputs_on_the_cpu(bundle_dir: Path, ckpt: Path) -> None:
    """The bundle loads on the CPU and computes what the checkpointed network computes."""
    det = load_bundle(bundle_dir, expected_task="detect")
    state = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    net = type(det.model)(**det.card["architecture"]["config"])
    net.load_state_dict(state)
    net.eval()
    x = torch.randn(1, 1, 96, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x).seg, det.model(x).seg, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_fracture_training_learns_and_its_checkpoint_resumes_on_the_cpu(device: str, toy: Path,
                                                                       tmp_path: Path) -> None:
    out, ckpt = tmp_path / "bundles", tmp_path / "ckpt"
    result = CliRunner().invoke(train, _fracture_args(toy, out, ckpt, 4, device))
    assert result.exit_code == 0, result.output
    history = _history(ckpt)
    assert len(history) == 4 and history[-1]["epoch_loss"] < history[0]["epoch_loss"]
    det = load_bundle(out / "detector", expected_task="detect")
    assert det.card["training"]["device"]["type"] == device and f"--device {device}" in det.card["training"]["command"]
    assert model_device(det.model) == torch.device("cpu")
    if device == "cuda":
        assert det.card["training"]["device"]["name"] == torch.cuda.get_device_name(0)
    _same_outputs_on_the_cpu(out / "detector", ckpt)
    # The checkpoint (optimiser state included) continues on the CPU, then on the first device again.
    result = CliRunner().invoke(train, [*_fracture_args(toy, out, ckpt, 5, "cpu"), "--resume"])
    assert result.exit_code == 0, result.output
    assert [h["epoch"] for h in _history(ckpt)] == [1, 2, 3, 4, 5]
    assert load_bundle(out / "detector", expected_task="detect").card["training"]["device"]["type"] == "cpu"
    result = CliRunner().invoke(train, [*_fracture_args(toy, out, ckpt, 6, device), "--resume"])
    assert result.exit_code == 0, result.output
    assert [h["epoch"] for h in _history(ckpt)] == [1, 2, 3, 4, 5, 6]
    assert load_bundle(out / "detector", expected_task="detect").card["training"]["device"]["type"] == device


@pytest.mark.parametrize("device", DEVICES)
def test_type_reader_and_radiograph_check_train_on_the_device(device: str, toy: Path, tmp_path: Path) -> None:
    det_out = tmp_path / "det"
    result = CliRunner().invoke(train, _fracture_args(toy, det_out, tmp_path / "c0", 1, "cpu"))
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(train, [
        "--task", "classify", "--data", str(toy), "--epochs", "3", "--out", str(tmp_path / "reader"),
        "--long-side", "192", "--patch", "64", "--width", "8", "--batch-size", "4", "--lr", "3e-3",
        "--checkpoint-dir", str(tmp_path / "c1"), "--workers", "0", "--val-fraction", "0.25", "--seed", "1",
        "--detector", str(det_out / "detector"), "--site-share", "0.3", "--device", device, "--quiet"])
    assert result.exit_code == 0, result.output
    history = _history(tmp_path / "c1")
    assert len(history) == 3 and "val_type_macro_f1" in history[-1]
    reader = load_bundle(tmp_path / "reader", expected_task="classify")
    assert reader.card["training"]["device"]["type"] == device
    assert model_device(reader.model) == torch.device("cpu")
    result = CliRunner().invoke(train, [
        "--task", "validity", "--data", str(toy), "--epochs", "2", "--out", str(tmp_path / "validity"),
        "--batch-size", "8", "--checkpoint-dir", str(tmp_path / "c2"), "--workers", "0", "--device", device,
        "--quiet"])
    assert result.exit_code == 0, result.output
    assert "val_accuracy" in _history(tmp_path / "c2")[-1]
    check = load_bundle(tmp_path / "validity", expected_task="validity")
    assert check.card["training"]["device"]["type"] == device
