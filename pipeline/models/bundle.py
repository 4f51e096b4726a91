"""Model bundles: a folder with ``model.json`` (the model card) and the weights (safetensors).

The card names the model, its task, its classes (for the classifier: the eleven taxonomy labels in
contract order), the input specification, the training data and seed, held-out metrics, the operating
point, the temperature and the SHA-256 of the weights file. :func:`load_bundle` refuses a bundle whose
weights do not match that hash, whose classes differ from :mod:`pipeline.taxonomy`, or whose architecture
is unknown, with a :class:`BundleError` that says which file and why.

Real weights trained elsewhere drop in through the same format: save a ``FractureNet``/``ValidityNet``
state dict with :func:`save_bundle` (or write ``weights.safetensors`` yourself and put its SHA-256 in the
card); see ``docs/MODELS.md``.

A bundle loads into any of three runtimes (:data:`RUNTIMES`): ``torch`` builds the :mod:`pipeline.models.nets`
module (training, and the type reader's Grad-CAM), ``numpy`` the same network in
:mod:`pipeline.models.numpy_nets` (what a job worker runs by default: no PyTorch in its process, the least
memory), and ``onnx`` that NumPy network with its convolutional trunk run by ONNX Runtime
(:mod:`pipeline.models.onnx_trunks`: the fastest, the command line's default). All read the
same verified weights file; :attr:`Bundle.engine` gives the pipeline one interface to each.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.taxonomy import DETECTION_CLASSES, FRACTURE_TYPES
from pipeline.types import ModelIdentity

if TYPE_CHECKING:
    from torch import nn

    from pipeline.models.runtime import Engine

CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"
DISCLAIMER = "Research use only. Not for diagnostic use."
FORMAT_VERSION = 1
TASKS = ("validity", "detect", "classify")
BUNDLE_NAMES = {"validity": "validity", "detect": "detector", "classify": "classifier"}  # task -> folder
VALIDITY_CLASSES: tuple[str, ...] = ("not_radiograph", "radiograph")
ARCHITECTURES: tuple[str, ...] = ("FractureNet", "TypeReader", "ValidityNet")  # classes of pipeline.models.nets
RUNTIMES: tuple[str, ...] = ("onnx", "numpy", "torch")
EXPECTED_CLASSES: dict[str, tuple[str, ...]] = {
    "validity": VALIDITY_CLASSES,
    "detect": DETECTION_CLASSES,
    "classify": FRACTURE_TYPES,
}


class BundleError(ValueError):
    """A model bundle is missing, corrupted, or does not fit the taxonomy contract."""


_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def sha256_file(path: Path, cached: bool = False) -> str:
    """The file's SHA-256. With ``cached``, a digest already taken of the same file with the same size and
    modification time is reused (for probes that ask often: ``/readyz``, ``/api/v1/models``); loading a bundle
    always hashes the bytes."""
    key = None
    if cached:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _hash_lock:
            if key in _hash_cache:
                return _hash_cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if key is not None:
        with _hash_lock:
            _hash_cache[key] = digest.hexdigest()
    return digest.hexdigest()


@dataclass
class Bundle:
    """A loaded, verified bundle: the network (a torch module in eval mode, or its NumPy counterpart) plus its
    card."""

    path: Path
    card: dict[str, Any]
    model: Any
    runtime: str = "torch"
    identity: ModelIdentity = field(init=False)
    _engine: Engine | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.identity = ModelIdentity(
            name=str(self.card["name"]),
            version=str(self.card["version"]),
            sha256=str(self.card["weights"]["sha256"]),
            task=str(self.card["task"]),
        )

    @property
    def task(self) -> str:
        return str(self.card["task"])

    @property
    def architecture(self) -> str:
        return str(self.card["architecture"]["class"])

    @property
    def engine(self) -> Engine:
        """The network behind the runtime-neutral interface of :mod:`pipeline.models.runtime`."""
        if self._engine is None:
            from pipeline.models.runtime import engine_for

            self._engine = engine_for(self.model)
        return self._engine

    @property
    def temperature(self) -> float:
        return float(self.card.get("temperature", 1.0))

    @property
    def operating_point(self) -> float:
        return float(self.card.get("operating_point", {}).get("threshold", 0.5))

    @property
    def indeterminate_band(self) -> tuple[float, float]:
        op = self.card.get("operating_point", {})
        band = op.get("indeterminate_band") or [self.operating_point, self.operating_point]
        return float(band[0]), float(band[1])

    @property
    def input_spec(self) -> dict[str, Any]:
        return dict(self.card.get("input", {}))


def card_time() -> str:
    """Now, in UTC, as model cards write their dates (``created``, a refit's ``date``)."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_card(
    *,
    name: str,
    task: str,
    architecture: str,
    config: dict[str, Any],
    input_spec: dict[str, Any],
    version: str = "1.0.0",
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    temperature: float = 1.0,
    operating_point: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a model card dictionary (the weights hash is filled in by :func:`save_bundle`)."""
    if task not in TASKS:
        raise BundleError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    card: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "task": task,
        "classes": list(EXPECTED_CLASSES[task]),
        "architecture": {"class": architecture, "config": config},
        "input": input_spec,
        "training": training or {},
        "metrics": metrics or {},
        "temperature": float(temperature),
        "operating_point": operating_point or {},
        "intended_use": DISCLAIMER.replace("Research use only. ", "Research use only, ").replace(
            "Not for", "not for"
        ),
        "disclaimer": DISCLAIMER,
        "created": card_time(),
    }
    if extra:
        card.update(extra)
    return card


def save_bundle(model: nn.Module, card: dict[str, Any], out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write ``weights.safetensors`` and ``model.json`` (with the weights' SHA-256) into ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in ("float32", "float16"):
        raise BundleError(f"unsupported weights dtype {dtype!r}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        if dtype == "float16" and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensors[key] = tensor
    weights = out / WEIGHTS_NAME
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})  # one key: byte-reproducible header
    tmp.replace(weights)
    weights.chmod(0o644)
    card = copy.deepcopy(card)
    card["weights"] = {"file": WEIGHTS_NAME, "format": "safetensors", "dtype": dtype,
                       "sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    (out / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return out


def read_card(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / CARD_NAME
    if not path.is_file():
        raise BundleError(f"{path}: model card missing (is {bundle_dir} a model bundle?)")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: model card is not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise BundleError(f"{path}: model card is not a JSON object")
    return card


def update_card(bundle_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge top-level fields into an existing card (metrics after evaluation); the hash is untouched."""
    card = read_card(bundle_dir)
    card.update(fields)
    (Path(bundle_dir) / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def verify_card(card: dict[str, Any], where: str) -> None:
    for key in ("name", "version", "task", "classes", "architecture", "weights"):
        if key not in card:
            raise BundleError(f"{where}: model card lacks {key!r}")
    task = card["task"]
    if task not in TASKS:
        raise BundleError(f"{where}: unknown task {task!r}")
    expected = list(EXPECTED_CLASSES[task])
    if list(card["classes"]) != expected:
        raise BundleError(
            f"{where}: classes {card['classes']} differ from the taxonomy contract {expected} "
            "(order matters: see shared/fracture-taxonomy.md)"
        )
    arch = card["architecture"].get("class")
    if arch not in ARCHITECTURES:
        raise BundleError(f"{where}: unknown architecture {arch!r}")


def verify_bundle(bundle_dir: str | Path, expected_task: str | None = None,
                  cached: bool = False) -> tuple[dict[str, Any], Path]:
    """The card and weights file of a bundle whose card keeps the contract and whose weights match its SHA-256
    (no network is built: cheap enough for a readiness probe, and with ``cached`` the digest of an unchanged
    file is reused: :func:`sha256_file`); :class:`BundleError` naming the file otherwise."""
    path = Path(bundle_dir)
    card = read_card(path)
    where = str(path / CARD_NAME)
    verify_card(card, where)
    if expected_task and card["task"] != expected_task:
        raise BundleError(f"{where}: task is {card['task']!r}, expected {expected_task!r}")
    weights = path / str(card["weights"].get("file", WEIGHTS_NAME))
    if not weights.is_file():
        raise BundleError(f"{weights}: weights file missing")
    actual = sha256_file(weights, cached=cached)
    if actual != card["weights"].get("sha256"):
        raise BundleError(
            f"{weights}: SHA-256 {actual} does not match the model card ({card['weights'].get('sha256')}); "
            "the bundle is corrupted or was modified — refusing to load it"
        )
    return card, weights


def verify_model_dir(model_dir: str | Path, cached: bool = False) -> None:
    """Check a model directory as the workers will load it (``validity/``, ``detector/``, ``classifier/``, each
    verified by :func:`verify_bundle`), without importing a network runtime; raise :class:`BundleError`."""
    root = Path(model_dir)
    if not root.is_dir():
        raise BundleError(f"model directory {root} does not exist")
    for task, name in BUNDLE_NAMES.items():
        verify_bundle(root / name, expected_task=task, cached=cached)


def load_bundle(bundle_dir: str | Path, expected_task: str | None = None, runtime: str = "torch",
                threads: int | None = None) -> Bundle:
    """Load and verify a bundle into ``runtime`` (one of :data:`RUNTIMES`); raise :class:`BundleError` with a
    precise message if anything is off. ``threads``: the ``onnx`` runtime's threads per network (None: ONNX
    Runtime's default, one per physical core)."""
    if runtime not in RUNTIMES:
        raise BundleError(f"unknown model runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    path = Path(bundle_dir)
    card, weights = verify_bundle(path, expected_task)
    arch, config = card["architecture"]["class"], card["architecture"].get("config", {})
    if runtime == "torch":
        model = _load_torch(weights, arch, config)
    else:
        model = _load_numpy(weights, arch, config)
        if runtime == "onnx":
            from pipeline.models.onnx_trunks import accelerate

            accelerate(model, threads)
    return Bundle(path=path, card=card, model=model, runtime=runtime)


def _load_torch(weights: Path, arch: str, config: dict[str, Any]) -> nn.Module:
    from safetensors.torch import load_file

    from pipeline.models import nets

    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise BundleError(f"{weights}: cannot read weights ({exc})") from None
    model: nn.Module = getattr(nets, arch)(**config)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not fit {arch}: {exc}") from None
    model.eval()
    return model


def _load_numpy(weights: Path, arch: str, config: dict[str, Any]) -> Any:
    from safetensors.numpy import load_file

    from pipeline.models.numpy_nets import NUMPY_ARCHITECTURES, WeightsError

    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise BundleError(f"{weights}: cannot read weights ({exc})") from None
    try:
        return NUMPY_ARCHITECTURES[arch](state, **config)
    except (WeightsError, TypeError) as exc:
        raise BundleError(f"{weights}: weights do not fit {arch}: {exc}") from None
