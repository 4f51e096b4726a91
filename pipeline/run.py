"""The pipeline wired in one place: validity -> detection -> type -> explanation.

Both inputs (DICOM listener and HTTP uploads, via the job workers) call :func:`analyze` with a
:class:`~pipeline.types.Radiograph` and a :class:`ModelSet` loaded once per process by :func:`load_models`.
Every output carries the identity (name, version, SHA-256) of the bundle that produced it, and the
Analysis carries the not-for-diagnostic-use statement.

The networks run in either runtime of :mod:`pipeline.models.runtime` (``numpy``, a job worker's default: no
PyTorch in the process; or ``torch``), through the same calls; this module imports neither torch nor the
torch networks.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipeline/models/__init__.py; before torch loads

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.explain import edge_view, heatmap_to_original, hybrid_overlay, peak_box, peak_point
from pipeline.models.architecture import SEG_STRIDE
from pipeline.models.bundle import BUNDLE_NAMES, RUNTIMES, Bundle, BundleError, load_bundle, verify_bundle
from pipeline.models.preprocess import (
    Geometry,
    Patch,
    add_patch_map,
    cut_patch,
    fracture_input,
    mirrored_input,
    patch_to_original,
    seg_peaks,
    standardise,
)
from pipeline.models.runtime import Engine, ReaderPass
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.types import (
    Analysis,
    ClassificationResult,
    DetectionCall,
    DetectionResult,
    Explanation,
    ModelIdentity,
    Radiograph,
)
from pipeline.validation import RadiographCheck

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "bundled"
DEFAULT_RUNTIME = "onnx"


@dataclass
class ModelSet:
    """The three bundles, loaded and verified once."""

    validity: RadiographCheck
    detector: Bundle
    classifier: Bundle
    model_dir: Path
    #: False: read each image once even where the reader's card says ``mirror`` (its ``single_reading`` fit)
    mirror: bool = True

    @property
    def shared_backbone(self) -> bool:
        """Detector and classifier are the same multi-head network (one forward pass serves both)."""
        return self.detector.identity.sha256 == self.classifier.identity.sha256

    @functools.cached_property
    def fusion(self) -> dict[str, Any] | None:
        """The type reader's detection fusion for this detector (its card's ``detection_fusion``, fitted behind
        a detector with this SHA-256), or None: the detector's own calibrated probability then stands alone.
        Worked out once (every image asks for it several times); with ``mirror`` False, the one-reading fit."""
        fusion = self.classifier.card.get("detection_fusion")
        if self.classifier.architecture != "TypeReader" or not isinstance(fusion, dict):
            return None
        if fusion.get("detector_sha256") != self.detector.identity.sha256:
            return None
        return fusion if self.mirror else single_reading(fusion)

    @property
    def operating_point(self) -> float:
        fusion = self.fusion
        return float(fusion["operating_point"]["threshold"]) if fusion else self.detector.operating_point

    @property
    def indeterminate_band(self) -> tuple[float, float]:
        fusion = self.fusion
        if not fusion:
            return self.detector.indeterminate_band
        lo, hi = fusion["operating_point"].get("indeterminate_band") or [self.operating_point] * 2
        return float(lo), float(hi)

    @property
    def identities(self) -> list[ModelIdentity]:
        ids = [self.detector.identity, self.classifier.identity]
        if self.validity.bundle is not None:
            ids.insert(0, self.validity.bundle.identity)
        return ids


def single_reading(fusion: dict[str, Any]) -> dict[str, Any]:
    """A detection fusion as it reads each image once: a card with ``mirror`` carries the same fusion fitted on
    the plain reading alone (``single_reading``: weights, bias, the second look's Platt scaling, the operating
    point), which replaces the mirrored fit; a card without ``mirror`` is returned as it is. Raises
    :class:`BundleError` for a mirrored card without that fit (refit it: ``fracture-node recalibrate``)."""
    if not mirror_look(fusion):
        return fusion
    single = fusion.get("single_reading")
    if not isinstance(single, dict):
        raise BundleError("the type reader's detection fusion reads each image twice (mirror) and has no "
                          "single_reading fit to read it once; refit the card with fracture-node recalibrate "
                          "--fuse-detection ... --mirror, or leave the mirrored look on")
    second = fusion.get("second_scale")
    if isinstance(second, dict):
        second = {**second, "platt": single["platt"]}
    return {**fusion, "weights": single["weights"], "bias": single["bias"],
            "operating_point": single["operating_point"], "second_scale": second, "mirror": False}


def load_models(model_dir: str | Path | None = None, num_threads: int | None = None,
                runtime: str = DEFAULT_RUNTIME, mirror: bool = True) -> ModelSet:
    """Load ``validity/``, ``detector/`` and ``classifier/`` from ``model_dir`` (default: the bundled ones) into
    ``runtime`` (``onnx``, ``numpy`` or ``torch``; ``num_threads`` sets torch's threads, or each ONNX Runtime
    session's; NumPy's BLAS reads ``OPENBLAS_NUM_THREADS``). ``mirror=False`` reads each image once even where
    the reader's card says ``mirror``, with the card's one-reading fit (:func:`single_reading`): about a third
    less time for a 2000 px image, the calibration kept (``FRACTURE_MIRROR_LOOK=off``).

    Raises :class:`~pipeline.models.bundle.BundleError` if a bundle is missing, corrupted or off-contract.
    """
    root = Path(model_dir) if model_dir is not None else BUNDLED_MODEL_DIR
    if runtime not in RUNTIMES:
        raise BundleError(f"unknown model runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if not root.is_dir():
        raise BundleError(f"model directory {root} does not exist")
    if num_threads and runtime == "torch":
        import torch

        torch.set_num_threads(num_threads)
    threads = num_threads if runtime == "onnx" else None
    validity = load_bundle(root / BUNDLE_NAMES["validity"], expected_task="validity", runtime=runtime,
                           threads=threads)
    detector = load_bundle(root / BUNDLE_NAMES["detect"], expected_task="detect", runtime=runtime, threads=threads)
    if detector.architecture != "FractureNet":
        raise BundleError(f"{detector.path}: expected a FractureNet bundle")
    cls_dir = root / BUNDLE_NAMES["classify"]
    cls_card, _weights = verify_bundle(cls_dir, expected_task="classify")
    if cls_card["weights"]["sha256"] == detector.identity.sha256:
        # Same weights: share one network instance (one forward pass serves both), built once.
        classifier = Bundle(path=cls_dir, card=cls_card, model=detector.model, runtime=runtime)
    else:
        classifier = load_bundle(cls_dir, expected_task="classify", runtime=runtime, threads=threads)
    if classifier.architecture not in ("FractureNet", "TypeReader"):
        raise BundleError(f"{classifier.path}: expected a FractureNet or TypeReader bundle")
    models = ModelSet(RadiographCheck(validity), detector, classifier, root, mirror=mirror)
    _ = models.fusion  # worked out now: a mirrored card without its one-reading fit is refused here, not per image
    return models


def calibrated_probability(logit: float, temperature: float) -> float:
    return float(0.5 * (1.0 + np.tanh(0.5 * logit / temperature)))  # never overflows, however extreme the logit


def tempered_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def detection_call(p: float, threshold: float, band: tuple[float, float]) -> DetectionCall:
    """``fracture`` above the band, ``no_fracture`` below it, ``indeterminate`` inside it."""
    lo, hi = min(band[0], threshold), max(band[1], threshold)
    if lo < hi and lo <= p < hi:
        return "indeterminate"
    return "fracture" if p >= threshold else "no_fracture"


@dataclass
class FractureOutputs:
    """Raw numbers of one image (used by evaluation as well as analyze)."""

    detect_logit: float
    probability: float
    type_probs: np.ndarray
    heatmap: np.ndarray | None = None  # the call's Grad-CAM at the original geometry (call_heatmap())
    detector_peak: tuple[int, int] | None = None  # (x, y) of the detector's own Grad-CAM maximum
    type_heatmap: np.ndarray | None = None
    type_centre: tuple[float, float] | None = None  # where a TypeReader read the type (original pixels)
    reader_evidence: float | None = None  # a TypeReader's strongest evidence over its sites (fusion's input)
    fused: bool = False  # the probability is the detector's logit fused with the reader's evidence
    coarse_logit: float | None = None  # the fused logit of the second, coarser pass (fusion's second_scale)
    type_scale: float = 1.0  # 1: the type was read at the native look; the second look's factor: read there
    # The detector's logit on the image as it is (with a mirrored look, detect_logit is the mean of both readings):
    # the detector as it runs without the reader's fusion, what its card's metrics describe.
    plain_detect_logit: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


TYPE_SITES = 3  # candidate sites a type reader bundle trained or recalibrated here is read at (its card's "sites")


@dataclass
class TypeSite:
    """One place a type reader read: a peak of the detector's segmentation map."""

    centre: tuple[float, float]  # (x, y) original pixels
    detector_evidence: float  # the detector's segmentation logit at the peak
    patch: Patch  # where the reader's patch lies in the original image
    read: ReaderPass  # the reader's pass over it (with its graph when read with ``cams``)

    @property
    def type_logits(self) -> np.ndarray:
        return self.read.type_logits

    @property
    def evidence(self) -> float:
        """The detector's logit plus the strongest cell of the reader's own segmentation map over the patch."""
        return self.detector_evidence + self.read.evidence


def read_type_sites(pixels: np.ndarray, seg: np.ndarray, geom: Geometry, reader: Engine, long_side: int,
                    patch: int, sites: int, cams: bool = False) -> list[TypeSite]:
    """The type reader at each of the ``sites`` strongest peaks of the detector's segmentation map ``seg``
    (peaks at least half a patch apart), strongest peak first.

    Where the two networks' evidence of a fracture is largest is where the type is read (:func:`choose_site`):
    the detector sees the whole image at its input size, the reader sees its patch at a finer scale, and on the
    selection sets the peak the detector alone ranks first was inside the true box less often than the one
    both rank highest (docs/MODELS.md, "Where the type is read"). With ``cams`` each pass keeps what the
    reader's Grad-CAM needs (torch runtime only)."""
    side = patch * max(pixels.shape) / long_side
    found = []
    for x, y, value in seg_peaks(seg, geom, SEG_STRIDE, sites, side / 2):
        region, where = cut_patch(pixels, (x, y), long_side, patch)
        rp = reader.classify(standardise(region), cams=cams)
        found.append(TypeSite((x, y), value, where, rp))
    return found


def choose_site(found: Sequence[TypeSite]) -> TypeSite:
    """The site with the largest summed evidence (the detector's strongest peak on a tie)."""
    return max(found, key=lambda site: site.evidence)


FUSION_FEATURES = ("detector_logit", "reader_evidence")


def reader_evidence(found: Sequence[TypeSite]) -> float:
    """The reader's strongest evidence of a fracture over its candidate sites: the largest cell of its own
    segmentation map in any of the patches it read (the detection fusion's second input)."""
    return evidence_site(found).read.evidence


def evidence_site(found: Sequence[TypeSite]) -> TypeSite:
    """The site whose patch holds the reader's strongest evidence (the first on a tie)."""
    return max(found, key=lambda site: site.read.evidence)


CALL_MAP_WEIGHTS = (0.5, 0.5)  # the detector's and the reader's Grad-CAM in the fused call's map


def call_heatmap(det_map: np.ndarray, site: TypeSite | None) -> np.ndarray:
    """The Grad-CAM map of the detection call at the original geometry, in [0, 1], built in place in
    ``det_map`` (the detector's Grad-CAM there).

    When the call is the detector alone (``site`` None) that is the map. When it is the detection fusion, the
    call's two inputs each get their Grad-CAM, scaled to its own peak, and the map is their average: the
    detector's over the whole image, and the reader's for its evidence (the strongest cell of its segmentation
    map, :func:`pipeline.models.numpy_nets.evidence_cam`) over the patch that holds it, zero elsewhere. Its peak
    is where both networks see the fracture; on the selection sets it fell inside the true box for 0.79 of
    fractured images against 0.68-0.70 for the detector's map alone (docs/MODELS.md, "The call's heatmap")."""
    if site is None or site.read.evidence_cam is None:
        return det_map
    w_det, w_reader = CALL_MAP_WEIGHTS
    det_map *= w_det
    return add_patch_map(det_map, site.read.evidence_cam, site.patch, w_reader)


def fused_detection_logit(detect_logit: float, evidence: float, fusion: dict[str, Any]) -> float:
    """The fused detection logit: ``w_detector * detector logit + w_reader * reader evidence + bias``, with the
    weights fitted by logistic regression on labelled calibration images (``fracture-node recalibrate
    --fuse-detection``). The detector sees the whole image at its input size; the reader sees its patches at
    twice that resolution, where a 1-2 px line keeps its contrast (docs/MODELS.md, "Detection fusion")."""
    w = fusion["weights"]
    return float(w["detector_logit"] * detect_logit + w["reader_evidence"] * evidence + fusion["bias"])


def second_scale(fusion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The detection fusion's second, coarser pass (its ``second_scale``: ``factor``, ``platt`` and optionally
    ``sites``, the reader's sites there, by default as many as in the native look), or None."""
    second = (fusion or {}).get("second_scale")
    return second if isinstance(second, dict) else None


def scaled_long_side(long_side: int, factor: float) -> int:
    """A network's long side for a pass that shows the image ``factor`` times smaller."""
    return max(32, int(round(long_side / factor)))


class NetworkInputs:
    """The detector's inputs for one image (:func:`fracture_input`), made once per long side. ``mirrored`` gives
    those of the image's left-right mirror from them, without resizing the mirror again (a mirrored look)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self._made: dict[int, tuple[np.ndarray, Geometry]] = {}

    def get(self, long_side: int) -> tuple[np.ndarray, Geometry]:
        if long_side not in self._made:
            self._made[long_side] = fracture_input(self.pixels, long_side)
        return self._made[long_side]

    def mirrored(self) -> NetworkInputs:
        out = NetworkInputs(np.ascontiguousarray(self.pixels[:, ::-1]))
        out._made = {side: (mirrored_input(x, geom), geom) for side, (x, geom) in self._made.items()}
        return out


def coarse_look(pixels: np.ndarray, detector: Engine, det_long: int, reader: Engine, reader_long: int, patch: int,
                sites: int, factor: float, cams: bool = False,
                inputs: NetworkInputs | None = None) -> tuple[float, list[TypeSite]]:
    """A second pass with the image shown ``factor`` times smaller to both networks: the detector at
    ``det_long / factor``, the reader's ``sites`` patches cut at ``reader_long / factor``. Returns the detector's
    logit and the reader's sites (their patches in original pixels, as the native look's). On two independently
    written simulators' images this coarser look found fractures the native one missed, at a small cost on the
    generator's (docs/MODELS.md, "A second, coarser look")."""
    coarse_side = scaled_long_side(det_long, factor)
    x, geom = inputs.get(coarse_side) if inputs is not None else fracture_input(pixels, coarse_side)
    fp = detector.forward(x, cams=False)
    found = read_type_sites(pixels, fp.seg, geom, reader, scaled_long_side(reader_long, factor), patch, sites,
                            cams=cams)
    return fp.detect_logit, found


def coarse_inputs(pixels: np.ndarray, detector: Engine, det_long: int, reader: Engine, reader_long: int,
                  patch: int, sites: int, factor: float) -> tuple[float, float]:
    """The detection fusion's two inputs (detector logit, reader evidence) from :func:`coarse_look`."""
    logit, found = coarse_look(pixels, detector, det_long, reader, reader_long, patch, sites, factor)
    return logit, reader_evidence(found)


def type_margin(second: dict[str, Any] | None) -> float | None:
    """The second look's ``type_margin``: by how much its fused logit must exceed the native look's before the
    type, its site and the reader's part of the call's map come from the coarser look (None: always the native
    look's, as cards without it)."""
    margin = (second or {}).get("type_margin")
    return None if margin is None else float(margin)


def two_scale_logit(native: float, coarse: float, second: dict[str, Any]) -> float:
    """The call's logit from the two passes' fused logits: a Platt scaling of their mean (``second["platt"]``,
    fitted on calibration images by ``fracture-node recalibrate --fuse-detection --second-scale F``)."""
    platt = second["platt"]
    return float(platt["scale"] * 0.5 * (native + coarse) + platt["bias"])


def type_sites(bundle: Bundle) -> int:
    """How many candidate sites a type reader bundle is read at: its card's ``input_spec.sites`` (1, the
    detector's strongest peak only, for cards that do not say)."""
    return max(1, int(bundle.input_spec.get("sites", 1)))


def mirror_look(fusion: dict[str, Any] | None) -> bool:
    """Whether the detection fusion looks at the image twice, as it is and mirrored left to right, and averages
    (its ``mirror``; cards without it look once)."""
    return bool((fusion or {}).get("mirror"))


@dataclass
class _Look:
    """One pass of the fracture models over one orientation of the image (see :func:`run_fracture_models`)."""

    detect_logit: float
    call_logit: float | None  # the call's logit (before the sigmoid) where the detection fusion applies
    type_probs: np.ndarray
    detector_peak: tuple[int, int] | None  # (x, y) of the detector's own Grad-CAM maximum
    call_map: np.ndarray | None  # the call's map (call_heatmap) at the original geometry
    type_heatmap: np.ndarray | None
    type_centre: tuple[float, float] | None
    evidence: float | None
    coarse: float | None
    type_scale: float


def run_fracture_models(radiograph: Radiograph, models: ModelSet, cams: bool = True,
                        type_cam: bool | None = None) -> FractureOutputs:
    """Detector + classifier (+ with ``cams``, Grad-CAM maps at the original geometry: the call's
    (:func:`call_heatmap`: the detector's, joined by the reader's where the call is the detection fusion), and
    the classifier's top type unless ``type_cam`` is False or, left None, the runtime cannot make it: the NumPy
    type reader).

    Where the detection fusion says ``mirror`` (:func:`mirror_look`), the whole pass is made twice, on the image
    and on its left-right mirror, and averaged: the call's logit (before the sigmoid), the detector's logit, the
    reader's evidence and the coarse look's logit, the type distribution, and the call's map (the mirrored
    pass's flipped back), so the call, the type and the map are the same for an image and its mirror. The type's
    centre, its scale, the type reader's own map and the detector's own map peak are the plain pass's
    (docs/MODELS.md, "A mirrored look")."""
    det_b, cls_b = models.detector, models.classifier
    can_type_cam = getattr(cls_b.engine, "supports_cam", True)
    type_cam = cams and (can_type_cam if type_cam is None else type_cam)
    fusion = models.fusion
    inputs = NetworkInputs(radiograph.pixels)
    looks = [_look(inputs, models, cams, type_cam)]
    if fusion and mirror_look(fusion) and cls_b.architecture == "TypeReader":
        looks.append(_look(inputs.mirrored(), models, cams, False))
    plain = looks[0]
    if len(looks) == 1:
        logit, call, evidence, coarse, probs = (plain.detect_logit, plain.call_logit, plain.evidence, plain.coarse,
                                                plain.type_probs)
    else:
        mirrored = looks[1]

        def mean(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else 0.5 * (a + b)

        logit = 0.5 * (plain.detect_logit + mirrored.detect_logit)
        call, evidence = mean(plain.call_logit, mirrored.call_logit), mean(plain.evidence, mirrored.evidence)
        coarse = mean(plain.coarse, mirrored.coarse)
        probs = 0.5 * (plain.type_probs + mirrored.type_probs)
        if plain.call_map is not None and mirrored.call_map is not None:
            plain.call_map += mirrored.call_map[:, ::-1]  # in place: one full-size map more than a single look
            plain.call_map *= 0.5
    p = calibrated_probability(call, 1.0) if call is not None else calibrated_probability(logit, det_b.temperature)
    return FractureOutputs(
        detect_logit=logit,
        probability=p,
        type_probs=probs,
        heatmap=plain.call_map,
        detector_peak=plain.detector_peak,
        type_heatmap=plain.type_heatmap,
        type_centre=plain.type_centre,
        reader_evidence=evidence,
        fused=call is not None,
        coarse_logit=coarse,
        type_scale=plain.type_scale,
        plain_detect_logit=plain.detect_logit,
    )


def _look(inputs: NetworkInputs, models: ModelSet, cams: bool, type_cam: bool) -> _Look:
    """The fracture models' pass over one orientation of the image (``inputs.pixels``): :func:`run_fracture_models`
    without the mirror."""
    det_b, cls_b = models.detector, models.classifier
    detector = det_b.engine
    pixels = inputs.pixels
    long_side = int(det_b.input_spec.get("long_side", 512))
    x, geom = inputs.get(long_side)
    fp = detector.forward(x, cams=cams)
    logit = fp.detect_logit
    det_cam = detector.cam(fp) if cams else None
    centre: tuple[float, float] | None = None
    evidence: float | None = None
    coarse: float | None = None
    z: float | None = None
    strongest: TypeSite | None = None
    type_scale = 1.0
    fusion = models.fusion
    if cls_b.architecture == "TypeReader":
        # Second stage: read the type from a patch around the fracture's likeliest site.
        spec = cls_b.input_spec
        found = read_type_sites(pixels, fp.seg, geom, cls_b.engine, int(spec["long_side"]),
                                int(spec["patch"]), type_sites(cls_b), cams=type_cam)
        site = choose_site(found)
        centre = site.centre
        strongest = evidence_site(found)
        evidence = strongest.read.evidence
        if fusion:
            z = fused_detection_logit(logit, evidence, fusion)
            second = second_scale(fusion)
            if second is not None:
                margin = type_margin(second)
                coarse_det, coarse_found = coarse_look(
                    pixels, detector, long_side, cls_b.engine, int(spec["long_side"]), int(spec["patch"]),
                    int(second.get("sites", type_sites(cls_b))), float(second["factor"]),
                    cams=type_cam and margin is not None, inputs=inputs)
                coarse = fused_detection_logit(coarse_det, reader_evidence(coarse_found), fusion)
                if margin is not None and coarse > z + margin:
                    # The coarser look is surer of a fracture: read the type where it placed it.
                    site, strongest = choose_site(coarse_found), evidence_site(coarse_found)
                    centre, type_scale = site.centre, float(second["factor"])
                z = two_scale_logit(z, coarse, second)
        probs = tempered_softmax(site.type_logits, cls_b.temperature)
        # With type_cam, the Grad-CAM of the top type over the chosen patch, pasted into the original geometry.
        type_map = patch_to_original(cls_b.engine.cam(site.read, int(np.argmax(probs))), site.patch,
                                     pixels.shape) if type_cam else None
    else:
        cls_engine, cls_fp, cls_geom = detector, fp, geom
        if not models.shared_backbone:
            cls_engine = cls_b.engine
            cls_long = int(cls_b.input_spec.get("long_side", 512))
            xc, cls_geom = fracture_input(pixels, cls_long) if cls_long != long_side else (x, geom)
            cls_fp = cls_engine.forward(xc, cams=type_cam)
        probs = tempered_softmax(cls_fp.type_logits, cls_b.temperature)
        type_map = heatmap_to_original(cls_engine.cam(cls_fp, int(np.argmax(probs))), cls_geom) \
            if type_cam else None
    det_peak = call_map = None
    if det_cam is not None:
        call_map = heatmap_to_original(det_cam, geom)
        det_peak = peak_point(call_map)
        call_map = call_heatmap(call_map, strongest if fusion else None)  # in place
    return _Look(detect_logit=logit, call_logit=z, type_probs=probs, detector_peak=det_peak, call_map=call_map,
                 type_heatmap=type_map, type_centre=centre, evidence=evidence, coarse=coarse, type_scale=type_scale)


@dataclass
class DetailedAnalysis:
    analysis: Analysis
    type_heatmap: np.ndarray | None = None


def analyze_detailed(radiograph: Radiograph, models: ModelSet, explain: bool = True,
                     type_map: bool = True) -> DetailedAnalysis:
    """:func:`analyze` plus, with ``type_map``, the classifier's top-class Grad-CAM map (for the analyze
    command)."""
    validity = models.validity(radiograph)
    analysis = Analysis(validity=validity, models=models.identities)
    if not validity.is_radiograph:
        return DetailedAnalysis(analysis)
    outs = run_fracture_models(radiograph, models, cams=explain, type_cam=type_map)
    det_b, cls_b = models.detector, models.classifier
    threshold = models.operating_point
    call = detection_call(outs.probability, threshold, models.indeterminate_band)
    analysis.detection = DetectionResult(
        probability=outs.probability, operating_point=threshold, call=call, model=det_b.identity,
        verified_by=cls_b.identity if outs.fused else None,
    )
    if call != "no_fracture":
        dist = {name: float(p) for name, p in zip(FRACTURE_TYPES, outs.type_probs, strict=True)}
        top = max(dist, key=lambda k: dist[k])
        analysis.classification = ClassificationResult(
            distribution=dist, top_type=top, top_probability=dist[top], model=cls_b.identity
        )
    type_heatmap = None
    if explain and outs.heatmap is not None:
        edges = edge_view(radiograph.pixels)
        analysis.explanation = Explanation(
            heatmap=outs.heatmap,
            edges=edges,
            hybrid=hybrid_overlay(radiograph.pixels, outs.heatmap, edges),
            peak_box=peak_box(outs.heatmap) if call != "no_fracture" else None,
        )
        type_heatmap = outs.type_heatmap if analysis.classification else None
    return DetailedAnalysis(analysis, type_heatmap)


def analyze(radiograph: Radiograph, models: ModelSet, explain: bool = True) -> Analysis:
    """Run the whole pipeline on one radiograph (the type's Grad-CAM, which :class:`Analysis` does not carry, is
    not computed: a full-size float map less in a worker's peak memory)."""
    return analyze_detailed(radiograph, models, explain=explain, type_map=False).analysis


def analyze_batch(radiographs: Sequence[Radiograph], models: ModelSet, explain: bool = True) -> list[Analysis]:
    """Analyse a small batch (as a worker does); images of different sizes are processed one by one."""
    return [analyze(r, models, explain=explain) for r in radiographs]


def identity_dict(identity: ModelIdentity | None) -> dict[str, str] | None:
    if identity is None:
        return None
    return {"name": identity.name, "version": identity.version, "sha256": identity.sha256, "task": identity.task}


def analysis_to_dict(analysis: Analysis) -> dict[str, object]:
    """JSON-ready summary of an Analysis (explanation images are referenced, not embedded)."""
    v = analysis.validity
    out: dict[str, object] = {
        "validity": {"verdict": v.verdict, "score": round(v.score, 4), "reason": v.reason,
                     "model": identity_dict(v.model)},
        "detection": None,
        "classification": None,
        "peak_box": None,
        "models": [identity_dict(m) for m in analysis.models],
        "disclaimer": analysis.disclaimer,
    }
    if analysis.detection is not None:
        d = analysis.detection
        out["detection"] = {"probability": round(d.probability, 4), "operating_point": round(d.operating_point, 4),
                            "call": d.call, "model": identity_dict(d.model),
                            "verified_by": identity_dict(d.verified_by)}
    if analysis.classification is not None:
        c = analysis.classification
        out["classification"] = {"top_type": c.top_type, "top_probability": round(c.top_probability, 4),
                                 "distribution": {k: round(p, 4) for k, p in c.distribution.items()},
                                 "model": identity_dict(c.model)}
    if analysis.explanation is not None and analysis.explanation.peak_box is not None:
        out["peak_box"] = analysis.explanation.peak_box.as_list()
    return out
