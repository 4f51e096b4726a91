"""Explanations: Grad-CAM maps at the input's geometry that follow the fracture, edges, overlay, peak box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.explain import edge_view, grad_cam, heatmap_to_original, hybrid_overlay, peak_box, peak_point
from pipeline.models.nets import FractureNet
from pipeline.models.preprocess import cut_patch, patch_to_original, prepare_fracture_input, seg_peak
from pipeline.training.toydata import toy_radiograph


def _line_detector_cam(pixels: np.ndarray) -> np.ndarray:
    """Grad-CAM through a fixed 'dark line on bright bone' detector: a known, interpretable network."""
    x, geom = prepare_fracture_input(pixels, 128)
    kernel = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0], [1.0, 1.0, 1.0]])[None, None]
    feats = F.relu(F.conv2d(F.avg_pool2d(x, 2), kernel.repeat(4, 1, 1, 1), padding=1))
    feats = F.max_pool2d(feats, 8).detach().requires_grad_(True)  # 1/16 like the real backbone
    score = (feats ** 2).sum()
    return heatmap_to_original(grad_cam(feats, score), geom)


def test_grad_cam_shape_and_peak_follows_fracture() -> None:
    rng = np.random.default_rng(0)
    boxes = []
    for cy in (30, 95):
        img, _mask, box = toy_radiograph(rng, True, 0, h=128, w=96, at=(cy, 48))
        cam = _line_detector_cam(img)
        assert cam.shape == img.shape
        assert cam.dtype == np.float32 and 0.0 <= cam.min() and cam.max() <= 1.0
        x, y = peak_point(cam)
        assert box is not None
        assert abs(y - cy) < 20, (y, cy)
        boxes.append(y)
    assert boxes[1] - boxes[0] > 40


def test_grad_cam_of_fracture_net_has_original_geometry() -> None:
    torch.manual_seed(0)
    net = FractureNet(width=8).eval()
    pixels = np.random.default_rng(1).random((301, 173)).astype(np.float32)
    x, geom = prepare_fracture_input(pixels, 128)
    with torch.no_grad():
        feats = net.backbone(x)
    feats.requires_grad_(True)
    out = net.heads(feats)
    cam = heatmap_to_original(grad_cam(feats, out.detect[0], retain_graph=True), geom)
    assert cam.shape == pixels.shape
    type_cam = heatmap_to_original(grad_cam(feats, out.types[0, 3]), geom)
    assert type_cam.shape == pixels.shape


def test_seg_peak_in_original_pixels() -> None:
    pixels = np.zeros((300, 200), np.float32)  # scaled to 128 x 85, padded to 128 x 96
    _x, geom = prepare_fracture_input(pixels, 128)
    seg = np.zeros((16, 12), np.float32)
    seg[5, 3] = 2.0
    seg[0, 11] = 9.0  # a cell over the padding only: ignored
    x, y = seg_peak(seg, geom, 8)
    assert x == pytest.approx(3.5 * 8 / geom.scale) and y == pytest.approx(5.5 * 8 / geom.scale)


@pytest.mark.parametrize("centre", [(150.0, 120.0), (5.0, 290.0)])
def test_patch_is_centred_and_maps_back(centre: tuple[float, float]) -> None:
    pixels = np.full((300, 400), 0.5, np.float32)
    cx, cy = int(centre[0]), int(centre[1])
    pixels[cy - 2:cy + 3, cx - 2:cx + 3] = 1.0  # a bright 5 px dot at the centre
    patch, where = cut_patch(pixels, centre, long_side=200, size=32)  # half scale: 64 original px
    assert patch.shape == (32, 32) and where.side == 64
    py, px = np.unravel_index(int(np.argmax(patch)), patch.shape)
    assert abs(py - 16) <= 1 and abs(px - 16) <= 1
    if cx < 32:
        assert patch[:, :4].max() == 0.0  # beyond the left edge: air
    back = patch_to_original(patch, where, pixels.shape)
    assert back.shape == pixels.shape
    by, bx = np.unravel_index(int(np.argmax(back)), back.shape)
    assert abs(bx - cx) <= 2 and abs(by - cy) <= 2
    outside = np.ones(pixels.shape, bool)
    outside[max(0, where.top):where.top + where.side, max(0, where.left):where.left + where.side] = False
    assert not back[outside].any()


def test_peak_box_in_original_coordinates() -> None:
    heat = np.zeros((400, 300), np.float32)
    heat[100:160, 200:260] = 1.0
    box = peak_box(heat)
    assert box is not None
    assert box.x0 == pytest.approx(200, abs=3) and box.x1 == pytest.approx(260, abs=3)
    assert box.y0 == pytest.approx(100, abs=3) and box.y1 == pytest.approx(160, abs=3)
    assert peak_box(np.zeros((10, 10), np.float32)) is None


def test_edges_and_hybrid() -> None:
    img, _m, _b = toy_radiograph(np.random.default_rng(2), True, 2)
    edges = edge_view(img)
    assert edges.shape == img.shape and set(np.unique(edges)) <= {0, 255}
    assert edges[:, 25:35].any()  # the bone's edge at x ~ 29
    heat = np.zeros_like(img)
    heat[60:70, 40:50] = 1
    hybrid = hybrid_overlay(img, heat, edges)
    assert hybrid.shape == (*img.shape, 3) and hybrid.dtype == np.uint8
    assert hybrid[65, 45, 0] > hybrid[65, 45, 2]  # red in the hot spot (JET)


def test_hybrid_overlay_in_bands_is_the_whole_image_overlay() -> None:
    rng = np.random.default_rng(3)
    img = rng.random((301, 203), dtype=np.float32)
    heat = np.clip(rng.normal(0.4, 0.3, img.shape), 0, 1).astype(np.float32)
    edges = np.where(rng.random(img.shape) > 0.9, 255, 0).astype(np.uint8)
    whole = hybrid_overlay(img, heat, edges, band_rows=10_000)
    banded = hybrid_overlay(img, heat, edges, band_rows=7)
    assert whole.shape == (301, 203, 3) and whole.dtype == np.uint8
    assert (whole[edges > 0] == (0, 255, 255)).all() and len(np.unique(whole[edges == 0])) > 50
    np.testing.assert_array_equal(banded, whole)
