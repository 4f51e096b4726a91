"""The NumPy runtime (what a job worker runs by default), and the onnx runtime that runs its trunks in ONNX
Runtime, against the PyTorch networks they re-implement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from config import Settings
from pipeline.cli_analyze import analyze as analyze_cmd
from pipeline.models.bundle import BundleError, load_bundle, make_card, read_card, save_bundle, update_card
from pipeline.models.nets import FractureNet, TypeReader, ValidityNet
from pipeline.models.numpy_nets import Conv, NumpyFractureNet, NumpyTypeReader, NumpyValidityNet
from pipeline.models.onnx_trunks import OrtTrunk, accelerate
from pipeline.models.runtime import engine_for
from pipeline.run import BUNDLED_MODEL_DIR, analyze, load_models, run_fracture_models
from pipeline.training.toydata import toy_radiograph, write_untrained_bundles
from pipeline.types import Radiograph
from service.db import Database
from service.ingest import ingest
from tests.conftest import free_port


def _randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight and batch-norm statistic random (freshly initialised norms are the identity, which would let
    a wrong fold of the norm into the convolution pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            else:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
    return net.eval()


def _numpy_state(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def _ported(cls: type, net: torch.nn.Module, runtime: str, width: int = 4):  # type: ignore[no-untyped-def]
    """``net`` in the NumPy runtime, with its trunk in ONNX Runtime for ``runtime == "onnx"``."""
    mine = cls(_numpy_state(net), width=width)
    if runtime == "onnx":
        accelerate(mine, threads=1)
        assert isinstance(mine.trunk, OrtTrunk)
    return mine


@pytest.mark.parametrize(("c", "h", "w", "k", "stride", "pad"), [
    (3, 17, 23, 3, 1, 1), (4, 16, 16, 3, 2, 1), (4, 15, 9, 3, 2, 1), (2, 9, 10, 5, 2, 2), (5, 31, 8, 7, 2, 3),
    (3, 12, 13, 3, 1, 0), (2, 11, 11, 5, 3, 2), (2, 2, 3, 5, 1, 2)])  # (2, 3) with k 5: every tap partly outside
def test_convolution_matches_torch_at_every_border(c: int, h: int, w: int, k: int, stride: int, pad: int) -> None:
    """The NumPy convolution gathers its taps from the unpadded input and zeroes those that fall outside."""
    rng = np.random.default_rng(k * 100 + h)
    x = rng.standard_normal((c, h, w)).astype(np.float32)
    weight = rng.standard_normal((6, c, k, k)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    ours = Conv(weight.reshape(6, -1).copy(), bias, k, stride, pad)(x)
    theirs = torch.nn.functional.conv2d(torch.from_numpy(x)[None], torch.from_numpy(weight), torch.from_numpy(bias),
                                        stride=stride, padding=pad)[0].numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("runtime", ["numpy", "onnx"])
@pytest.mark.parametrize("shape", [(64, 96), (37, 53), (8, 70)])  # (8, 70): smaller than the blur's radius
def test_detector_forward_and_grad_cam_match_torch(shape: tuple[int, int], runtime: str) -> None:
    """(37, 53): the pyramid's upsampling from sizes that are not halves of each other (3 x 4 from 2 x 2)."""
    net = _randomised(FractureNet(width=4), 1)
    mine = _ported(NumpyFractureNet, net, runtime)
    torch_engine = engine_for(net)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ours, theirs = mine.forward(x), torch_engine.forward(x, cams=True)
    assert ours.detect_logit == pytest.approx(theirs.detect_logit, abs=1e-4)
    np.testing.assert_allclose(ours.type_logits, theirs.type_logits, atol=1e-4)
    np.testing.assert_allclose(ours.seg, theirs.seg, atol=1e-4)
    for target in (None, 0, 5):  # the detection logit and two types' logits
        cam = mine.cam(ours, target)
        assert cam.max() == pytest.approx(1.0) or not cam.any()
        np.testing.assert_allclose(cam, torch_engine.cam(theirs, target), atol=1e-4)


@pytest.mark.parametrize("runtime", ["numpy", "onnx"])
def test_type_reader_and_radiograph_check_match_torch(runtime: str) -> None:
    reader = _randomised(TypeReader(width=4), 3)
    patch = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)
    mine, theirs = _ported(NumpyTypeReader, reader, runtime).classify(patch), engine_for(reader).classify(patch)
    np.testing.assert_allclose(mine.type_logits, theirs.type_logits, atol=1e-4)
    assert np.isfinite(mine.evidence) and mine.evidence == pytest.approx(theirs.evidence, abs=1e-4)
    assert mine.evidence_cam is not None and theirs.evidence_cam is not None
    np.testing.assert_allclose(mine.evidence_cam, theirs.evidence_cam, atol=1e-4)
    check = _randomised(ValidityNet(width=4), 5)
    x = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32)
    assert _ported(NumpyValidityNet, check, runtime).logit(x) == pytest.approx(engine_for(check).logit(x), abs=1e-4)


def test_reader_evidence_cam_is_the_grad_cam_of_its_evidence() -> None:
    """The closed form both runtimes use is autograd's Grad-CAM of the strongest segmentation cell."""
    from pipeline.explain import grad_cam

    maps = 0
    for seed in range(6):
        reader = _randomised(TypeReader(width=4), seed)
        patch = np.random.default_rng(seed + 1).standard_normal((128, 128)).astype(np.float32)
        feats = reader.features(torch.from_numpy(patch)[None, None]).detach().requires_grad_(True)
        expected = grad_cam(feats, reader.heads(feats).seg.max())
        maps += bool(expected.max() == pytest.approx(1.0) and (expected < 0.5).any())  # a map, not a constant
        for engine in (engine_for(reader), NumpyTypeReader(_numpy_state(reader), width=4)):
            cam = engine.classify(patch).evidence_cam
            assert cam is not None and cam.shape == expected.shape
            np.testing.assert_allclose(cam, expected, atol=1e-5)
    assert maps >= 3  # random weights can leave every cell below the bias (an all-zero map): most must not


@pytest.mark.parametrize("runtime", ["numpy", "onnx"])
@pytest.mark.parametrize("layout", ["shared", "reader", "reader-3-sites", "reader-fused", "separate"])
def test_the_pipeline_gives_the_same_results_in_every_runtime(layout: str, runtime: str, tmp_path: Path) -> None:
    root = write_untrained_bundles(tmp_path, reader=layout.startswith("reader"),
                                   classifier_long_side=200 if layout == "separate" else None)
    if layout in ("reader-3-sites", "reader-fused"):
        update_card(root / "classifier", input={**read_card(root / "classifier")["input"], "sites": 3})
    if layout == "reader-fused":
        sha = read_card(root / "detector")["weights"]["sha256"]
        update_card(root / "classifier", detection_fusion={
            "detector_sha256": sha, "weights": {"detector_logit": 0.8, "reader_evidence": 0.5}, "bias": -0.2,
            "operating_point": {"threshold": 0.5, "indeterminate_band": [0.4, 0.6]}})
    reference, mine = load_models(root, runtime="torch"), load_models(root, runtime=runtime, num_threads=1)
    assert mine.detector.runtime == runtime and mine.shared_backbone == reference.shared_backbone
    assert all((bundle.model.trunk is not None) == (runtime == "onnx")
               for bundle in (mine.validity.bundle, mine.detector, mine.classifier))
    # The same weights in both bundles: one network, built once, serves both (one session in onnx).
    assert (mine.classifier.model is mine.detector.model) == (layout == "shared") == mine.shared_backbone
    type_cam = not layout.startswith("reader")  # the NumPy type reader has no Grad-CAM
    for seed, (h, w) in enumerate([(300, 200), (180, 260)]):
        img, _m, _b = toy_radiograph(np.random.default_rng(seed), True, 1, h=h, w=w)
        ref = run_fracture_models(Radiograph(pixels=img), reference, type_cam=type_cam)
        out = run_fracture_models(Radiograph(pixels=img), mine, type_cam=type_cam)
        assert out.probability == pytest.approx(ref.probability, abs=1e-5)
        np.testing.assert_allclose(out.type_probs, ref.type_probs, atol=1e-5)
        assert out.heatmap is not None and ref.heatmap is not None
        np.testing.assert_allclose(out.heatmap, ref.heatmap, atol=1e-4)
        assert out.fused == ref.fused == (layout == "reader-fused")
        if type_cam:
            assert out.type_heatmap is not None and ref.type_heatmap is not None
            np.testing.assert_allclose(out.type_heatmap, ref.type_heatmap, atol=1e-4)
        assert out.type_centre == ref.type_centre


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "detector" / "model.json").exists(), reason="no bundled models")
@pytest.mark.parametrize("runtime", ["numpy", "onnx"])
def test_bundled_models_give_the_same_analysis_in_every_runtime(runtime: str) -> None:
    synth = pytest.importorskip("pipeline.synth")
    reference, mine = load_models(runtime="torch"), load_models(runtime=runtime)
    for seed, fracture in ((11, True), (12, False), (13, True)):
        pixels = synth.display_image(synth.render_sample(seed, fracture=fracture, long_side=900))
        ref, out = analyze(Radiograph(pixels=pixels), reference), analyze(Radiograph(pixels=pixels), mine)
        assert out.validity.verdict == ref.validity.verdict and out.validity.score == pytest.approx(
            ref.validity.score, abs=1e-5)
        assert out.detection is not None and ref.detection is not None
        # Both runtimes blur the high-pass input with the same float32 taps (architecture.highpass_kernel). Until
        # session 15 each computed its own, an ulp apart, and the detection logit differed by up to 3.1e-4 from a
        # float64 pass (PyTorch: 6.4e-6); with the shared taps both are within 4e-6 of it on five synthetic
        # images, and these probabilities agree to 6e-7. A missing fusion or a wrong weight moves them far more.
        assert out.detection.probability == pytest.approx(ref.detection.probability, abs=1e-5)
        assert out.detection.call == ref.detection.call
        assert (out.classification is None) == (ref.classification is None)
        if out.classification is not None and ref.classification is not None:
            assert out.classification.top_type == ref.classification.top_type
            for name, p in ref.classification.distribution.items():
                assert out.classification.distribution[name] == pytest.approx(p, abs=1e-5)
        assert out.explanation is not None and ref.explanation is not None
        # The maps are scaled to [0, 1]. Through the 768 px bundled detector, float32 sums in a different order
        # (oneDNN against NumPy) differ by up to about 1.2e-4 on a few hundred of 670 000 pixels, and by how
        # much varies with oneDNN's choice of kernels from run to run; the peak box must still be identical.
        np.testing.assert_allclose(out.explanation.heatmap, ref.explanation.heatmap, atol=5e-4)
        assert out.explanation.peak_box == ref.explanation.peak_box
        assert [m.sha256 for m in out.models] == [m.sha256 for m in ref.models]


def test_numpy_type_reader_says_its_map_needs_torch(tmp_path: Path) -> None:
    models = load_models(write_untrained_bundles(tmp_path, reader=True), runtime="numpy")
    img, _m, _b = toy_radiograph(np.random.default_rng(0), True, 1, h=300, w=200)
    assert run_fracture_models(Radiograph(pixels=img), models).type_heatmap is None  # left out by default
    with pytest.raises(NotImplementedError, match="torch runtime"):
        run_fracture_models(Radiograph(pixels=img), models, type_cam=True)
    png = tmp_path / "knee.png"
    import cv2

    cv2.imwrite(str(png), (img * 255).astype(np.uint8))
    result = CliRunner().invoke(analyze_cmd, [str(png), "--models", str(tmp_path), "--runtime", "numpy",
                                              "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "knee.hybrid.png").is_file() and not (tmp_path / "o" / "knee.type_heatmap.png").exists()


def test_numpy_loader_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    net = FractureNet(width=4).eval()
    card = make_card(name="misfit", task="detect", architecture="FractureNet", config={"width": 8, "num_types": 11},
                     input_spec={"long_side": 128})
    save_bundle(net, card, tmp_path / "misfit")  # weights of width 4 under a card that says 8
    with pytest.raises(BundleError, match="do not fit FractureNet: tensor 'stem.0.weight' has shape"):
        load_bundle(tmp_path / "misfit", runtime="numpy")
    extra = FractureNet(width=4).eval()
    extra.register_buffer("stray", torch.zeros(3))
    save_bundle(extra, make_card(name="extra", task="detect", architecture="FractureNet",
                                 config={"width": 4, "num_types": 11}, input_spec={"long_side": 128}),
                tmp_path / "extra")
    with pytest.raises(BundleError, match="unexpected tensors \\['stray'\\]"):
        load_bundle(tmp_path / "extra", runtime="numpy")
    with pytest.raises(BundleError, match="unknown model runtime 'tensorflow'"):
        load_models(tmp_path, runtime="tensorflow")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "numpy", "torch", None])
def test_a_worker_loads_the_libraries_of_its_runtime_only(runtime: str | None, worker_settings: Settings,
                                                          db: Database, make_dicom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``fracture-node work`` processes a study; on the onnx (the default: ``None``, nothing set) and numpy
    runtimes PyTorch is not in its memory map, and ONNX Runtime is there on the onnx runtime only (the torch run
    shows the check can see a library)."""
    settings = worker_settings
    result = ingest(db, settings, make_dicom("DX").read_bytes())
    env = {**{k: v for k, v in os.environ.items() if k != "FRACTURE_MODEL_RUNTIME"},
           "FRACTURE_DATA_DIR": str(settings.data_dir), "FRACTURE_DATABASE_URL": settings.database_url,
           "FRACTURE_MODEL_DIR": str(settings.model_dir), "FRACTURE_DICOM_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", **({"FRACTURE_MODEL_RUNTIME": runtime} if runtime else {})}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "work", "--poll-interval", "0.2"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        from service.models import Job

        deadline = time.monotonic() + 120
        while True:
            with db.session() as session:
                job = session.query(Job).filter(Job.instance_pk == result.instance_pk).one()
                state = job.state
            if state in ("done", "failed") or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert state == "done", log.read_text()
        mapped = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert ("libtorch" in mapped) == (runtime == "torch"), log.read_text()
    assert ("onnxruntime" in mapped) == (runtime in ("onnx", None)), log.read_text()


def test_both_runtimes_blur_the_high_pass_input_with_the_same_taps() -> None:
    """The fixed high-pass channel is part of the network: both runtimes take its float32 taps from one place
    (an ulp's difference there once became 3e-4 in the bundled detector's logit), and give the same channel."""
    from pipeline.models.architecture import HIGHPASS_SIGMA, highpass_kernel
    from pipeline.models.nets import HighPass
    from pipeline.models.numpy_nets import highpass

    taps = highpass_kernel()
    assert taps.dtype == np.float32 and len(taps) == 2 * round(3 * HIGHPASS_SIGMA) + 1
    assert float(taps.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6) and int(taps.argmax()) == len(taps) // 2
    np.testing.assert_array_equal(HighPass().kernel.numpy().ravel(), taps)
    for shape in ((97, 131), (6, 40)):  # reflected edges; replicated where the image is no larger than the radius
        img = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            expected = HighPass()(torch.from_numpy(img)[None, None])[0].numpy()
        np.testing.assert_allclose(highpass(img), expected, atol=2e-6)


def test_the_onnx_trunks_are_valid_onnx_models_that_hold_the_folded_weights() -> None:
    """The graphs are written in protobuf's wire format by hand (no ``onnx`` in a worker): ONNX's own checker, with
    shape inference, must accept them, and the weights they carry must be the NumPy network's, bit for bit."""
    import onnx
    from onnx import numpy_helper

    from pipeline.models.onnx_trunks import detector_graph, reader_graph, validity_graph

    nets = [(detector_graph, NumpyFractureNet, FractureNet, 2), (reader_graph, NumpyTypeReader, TypeReader, 2),
            (validity_graph, NumpyValidityNet, ValidityNet, 1)]
    for seed, (graph, numpy_cls, torch_cls, channels) in enumerate(nets):
        mine = numpy_cls(_numpy_state(_randomised(torch_cls(width=4), seed)), width=4)
        model = onnx.load_from_string(graph(mine))
        onnx.checker.check_model(model, full_check=True)
        assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [
            "n", channels, "h", "w"]
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        stem = convs[0]
        np.testing.assert_array_equal(weights[stem.input[1]].reshape(mine.stem.weight.shape), mine.stem.weight)
        np.testing.assert_array_equal(weights[stem.input[2]], mine.stem.bias)
        attrs = {a.name: list(a.ints) for a in stem.attribute}
        assert attrs == {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        blocks = len(mine.blocks) if numpy_cls is NumpyValidityNet else (10 if numpy_cls is NumpyFractureNet else 8)
        assert len(convs) >= 1 + 2 * blocks
