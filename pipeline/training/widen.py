"""Function-preserving widening of a trained :class:`~pipeline.models.nets.FractureNet` (Net2WiderNet).

A detector trained at one base width starts a wider network that computes exactly what it computed: every channel
of the wider network is a copy of one of the narrow network's channels (its incoming weights, batch-norm
parameters and running statistics copied), and a layer that reads a channel copied ``n`` times reads each copy
with its weights split ``n`` ways, so the copies' contributions sum to the original's (Chen, Goodfellow and
Shlens, "Net2Net", ICLR 2016). The split is random per weight (positive shares that sum to one), so copies of one
channel get different gradients and part ways when training continues; an even split would keep them equal.

Channels that must stay in one correspondence are one *space*: a residual stage's output (its identity skips add
it to itself), the pyramid's lateral sum, and each block's inner channels, the stem's and the fused pyramid's on
their own. Each space gets one mapping from new channels to old ones: the old channels first, in order, then
extra copies of old channels drawn without replacement (more than doubling repeats the draw).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["fracture_net_width", "widen_fracture_state"]

#: One layer: (tensor prefix, kind, input space, output space); kind is conv (weight [out, in, ...], optional
#: bias), bn or linear; a space of None is not widened (the two input channels, a head's outputs).
Layer = tuple[str, str, str | None, str | None]

#: Each space's channels as a multiple of the base width (see FractureNet): the stem, each stage's output
#: ("s1"-"s4") and its two blocks' inner channels ("s1b0"...), the pyramid's lateral sum, the fused pyramid and
#: the type head's hidden layer.
_SPACE_MULT = {"stem": 1, "pyr": 3, "fuse": 3, "type": 4,
               **{f"s{s}{inner}": m for s, m in ((1, 1), (2, 2), (3, 4), (4, 8)) for inner in ("", "b0", "b1")}}


def _layers() -> list[Layer]:
    layers: list[Layer] = [("stem.0", "conv", None, "stem"), ("stem.1", "bn", None, "stem")]
    prev = "stem"
    for s in range(1, 5):
        out = f"s{s}"
        for b in range(2):
            inner = f"s{s}b{b}"
            source = prev if b == 0 else out
            layers += [(f"stage{s}.{b}.conv1", "conv", source, inner), (f"stage{s}.{b}.bn1", "bn", None, inner),
                       (f"stage{s}.{b}.conv2", "conv", inner, out), (f"stage{s}.{b}.bn2", "bn", None, out)]
        layers += [(f"stage{s}.0.skip.0", "conv", prev, out), (f"stage{s}.0.skip.1", "bn", None, out)]
        prev = out
    layers += [("lat2", "conv", "s2", "pyr"), ("lat3", "conv", "s3", "pyr"), ("lat4", "conv", "s4", "pyr"),
               ("fuse.0", "conv", "pyr", "fuse"), ("fuse.1", "bn", None, "fuse"),
               ("seg_head", "conv", "fuse", None), ("det_fc", "linear", "fuse2", None),
               ("type_fc.0", "linear", "fuse2", "type"), ("type_fc.3", "linear", "type", None)]
    return layers


def fracture_net_width(state: dict[str, torch.Tensor]) -> int:
    """The base width of the FractureNet whose state this is (the stem's output channels)."""
    return int(state["stem.0.weight"].shape[0])


def _mapping(old: int, new: int, rng: np.random.Generator) -> np.ndarray:
    extra: list[int] = []
    while len(extra) < new - old:
        extra += list(rng.permutation(old)[: new - old - len(extra)])
    return np.concatenate([np.arange(old), np.array(extra, dtype=np.int64)]).astype(np.int64)


def _shares(mapping: np.ndarray, rows: int, taps: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """Per (output row, new input channel, tap): a positive share of the old weight; the shares of one old
    channel's copies sum to one for every row and tap."""
    raw = rng.uniform(0.5, 1.5, size=(rows, len(mapping), *taps))
    totals = np.zeros((rows, int(mapping.max()) + 1, *taps))
    for column, old in enumerate(mapping):
        totals[:, old] += raw[:, column]
    return torch.from_numpy(raw / totals[:, mapping]).float()


def widen_fracture_state(state: dict[str, torch.Tensor], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state of a FractureNet of base ``width`` that computes what ``state`` (a narrower FractureNet's)
    computes, in evaluation mode, to float32 rounding. ``width`` must not be below the state's own."""
    old_width = fracture_net_width(state)
    if width < old_width:
        raise ValueError(f"cannot widen a width-{old_width} network to {width}: narrowing is not function-preserving")
    rng = np.random.default_rng(seed)
    maps = {name: _mapping(mult * old_width, mult * width, rng) for name, mult in _SPACE_MULT.items()}
    # The detection and type heads read the fused features twice (attention-pooled, then max-pooled).
    fuse = maps["fuse"]
    maps["fuse2"] = np.concatenate([fuse, fuse + 3 * old_width])
    out: dict[str, torch.Tensor] = {}
    for prefix, kind, space_in, space_out in _layers():
        rows = maps[space_out] if space_out is not None else None
        if kind == "bn":
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                out[f"{prefix}.{leaf}"] = state[f"{prefix}.{leaf}"].float()[rows].clone()
            out[f"{prefix}.num_batches_tracked"] = state[f"{prefix}.num_batches_tracked"].clone()
            continue
        weight = state[f"{prefix}.weight"].float()
        if rows is not None:
            weight = weight[rows]
        if space_in is not None:
            cols = maps[space_in]
            weight = weight[:, cols] * _shares(cols, weight.shape[0], tuple(weight.shape[2:]), rng)
        out[f"{prefix}.weight"] = weight.contiguous()
        if f"{prefix}.bias" in state:
            bias = state[f"{prefix}.bias"].float()
            out[f"{prefix}.bias"] = (bias[rows] if rows is not None else bias).clone()
    missing = set(state) - set(out)
    if missing:
        raise ValueError(f"not a FractureNet state: {', '.join(sorted(missing)[:5])} not widened")
    return out
