"""Grad-CAM: the layer it explains, a model whose answer is known, overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from breast_cancer_detection.errors import UserError
from breast_cancer_detection.explain import GradCAM, explain, find_target_layer, overlay
from breast_cancer_detection.inference import Predictor
from breast_cancer_detection.models import create_model


class CornerModel(nn.Module):
    """Looks only at the top-left quarter of a colour feature map.

    ``features`` is a fixed 1x1 convolution and ReLU: channel 0 is red-ness (R - B), channel 1
    blue-ness (B - R). The class-1 logit is the mean over the top-left quarter of
    (red-ness - blue-ness); class 0's is its negative. On an image that is red top-left and
    blue bottom-right, Grad-CAM for class 1 must light the red corner only, and for class 0
    the blue one.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, stride=2, bias=False)  # half-size map: tests the upsampling
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]])[..., None, None])
        self.features = nn.Sequential(conv, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        h, w = f.shape[-2:]
        corner = f[:, :, : h // 4, : w // 4].mean(dim=(2, 3))
        score = corner[:, 0] - corner[:, 1]
        return torch.stack([-score, score], dim=1)


def _corner_image(h: int = 48, w: int = 64) -> torch.Tensor:
    x = torch.full((1, 3, h, w), 0.5)
    x[0, :, : h // 4, : w // 4] = torch.tensor([1.0, 0.2, 0.1])[:, None, None]  # red, top left
    x[0, :, -h // 4:, -w // 4:] = torch.tensor([0.1, 0.2, 1.0])[:, None, None]  # blue, bottom right
    return x


def test_grad_cam_lights_the_corner_the_model_reads():
    model = CornerModel()
    x = _corner_image()
    assert model(x)[0, 1] > 0  # the model does call the red corner class 1
    cam = GradCAM(model)(x, target=1)
    assert cam.shape == (1, 48, 64) and cam.dtype == np.float32
    top_left, bottom_right = cam[0, :12, :16], cam[0, -12:, -16:]
    assert top_left[2:-2, 2:-2].min() > 0.95 and bottom_right.max() < 0.05
    assert cam[0, 24:36, 0:16].max() < 0.05  # the grey middle rows hold no evidence
    # The other class's evidence is the blue corner; default target is the top logit.
    other = GradCAM(model)(x, target=0)[0]
    assert other[-12:, -16:][2:-2, 2:-2].min() > 0.95 and other[:12, :16].max() < 0.05
    np.testing.assert_array_equal(GradCAM(model)(x)[0], cam[0])


def test_grad_cam_per_image_targets_and_no_side_effects():
    model = CornerModel()
    x = torch.cat([_corner_image(), _corner_image().flip(-1)])  # second: red top right
    cams = GradCAM(model)(x, target=[1, 1])
    assert cams[0, :12, :16].mean() > 0.9 and cams[1, :12, -16:].mean() > 0.9
    assert cams[1, :12, :16].max() < 0.05
    assert not model.features._forward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_target_layer_is_the_last_feature_map():
    assert find_target_layer(CornerModel()) is not None
    dense = create_model("densenet121")
    assert find_target_layer(dense) is dense.features
    res = create_model("resnet18")
    assert find_target_layer(res) is res.layer4
    for name in ("tiny", "patch_cnn"):
        m = create_model(name)
        assert find_target_layer(m) is m.features
    with pytest.raises(UserError, match="no convolutional layer"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))


def _small_densenet() -> nn.Module:
    """torchvision's DenseNet class (its forward, in-place ReLU included), a few layers deep."""
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                    num_classes=2)


@pytest.mark.parametrize("size", [pytest.param("densenet121", marks=pytest.mark.slow),
                                  "small"])
def test_grad_cam_on_a_frozen_densenet_uses_the_features_own_output(size):
    torch.manual_seed(0)
    model = (create_model("densenet121") if size == "densenet121" else _small_densenet()).eval()
    for p in model.parameters():
        p.requires_grad = False  # a frozen backbone, as the seed notebook trained it
    x = torch.randn(1, 3, 64, 64)
    cam = GradCAM(model)(x, target=1)
    assert cam.shape == (1, 64, 64) and cam.max() == pytest.approx(1.0) and cam.min() == 0.0
    # By hand: DenseNet applies an in-place ReLU after `features`; the map must weigh the
    # features' own (pre-ReLU) output, not the tensor that ReLU overwrote.
    a = model.features(x).detach().requires_grad_(True)
    logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(a), 1), 1))
    (g,) = torch.autograd.grad(logits[0, 1], a)
    m = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    m = F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    m = ((m - m.min()) / (m.max() - m.min())).numpy()
    np.testing.assert_allclose(cam[0], m, atol=1e-5)


def test_overlay_colours_in_viridis_and_leaves_unseen_parts_alone():
    image = Image.new("RGB", (80, 40), (128, 128, 128))
    cam = np.zeros((10, 20), np.float32)
    cam[:, 10:] = 1.0
    out = np.asarray(overlay(image, cam, alpha=1.0)).astype(int)
    assert out.shape == (40, 80, 3)
    left, right = out[20, 5], out[20, 75]
    # viridis, readable with red-green colour blindness: dark purple low, yellow high.
    np.testing.assert_allclose(left, (68, 1, 84), atol=2)
    np.testing.assert_allclose(right, (253, 231, 37), atol=2)
    half = np.asarray(overlay(image, cam, alpha=0.0)).astype(int)
    assert (half == 128).all()
    cam[:5] = np.nan  # the top half: no model input showed it
    out = np.asarray(overlay(image, cam, alpha=1.0)).astype(int)
    assert (out[:18] == 128).all() and (out[22:, 75] != 128).any()


def _threshold_against_the_top_logit(pred: Predictor, image) -> tuple[int, int]:
    """Sets ``pred.threshold`` so that the label at it is not the top logit's class; returns
    (class at the threshold, class of the top logit)."""
    p = pred.predict(image)[0].p_malignant
    top = int(p >= 0.5)
    pred.threshold = (p + 1.0) / 2 if top else p / 2  # benign above p, malignant below it
    assert pred.predict(image)[0].label == pred.classes[1 - top]
    return 1 - top, top


def test_explain_uses_the_predicted_label(trained_run):
    # The threshold flips the label away from the top logit: the map must follow the label.
    pred = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (46, 70, 3), np.uint8))
    label, top = _threshold_against_the_top_logit(pred, image)
    view, cam = explain(pred, image, frame="model")
    assert view.size == (32, 32) and cam.shape == (32, 32)
    x = pred.transform(image)[None]
    np.testing.assert_allclose(cam, GradCAM(pred.model)(x, target=label)[0], atol=1e-6)
    assert not np.allclose(cam, GradCAM(pred.model)(x, target=top)[0], atol=1e-3)
    pred.backend = "onnx"
    with pytest.raises(UserError, match="PyTorch checkpoint"):
        explain(pred, image)


def test_explain_of_a_tiled_image_uses_the_predicted_label(trained_run):
    pred = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 160, 3), np.uint8))
    assert pred.predict(image)[0].tiles > 1
    label, top = _threshold_against_the_top_logit(pred, image)
    _, cam = explain(pred, image)
    np.testing.assert_allclose(cam, explain(pred, image, target=label)[1], atol=1e-6)
    assert not np.allclose(cam, explain(pred, image, target=top)[1], atol=1e-3,
                           equal_nan=True)


def test_explain_draws_the_map_in_the_image_frame_over_the_part_the_model_saw(trained_run):
    # 46 x 70 px, short side resized to 40, centre 32 px crop: the model saw the centre
    # 36.8 x 36.8 px of the image; the map lies there, at the image's aspect, NaN elsewhere.
    pred = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu")
    assert (pred.pre.size, pred.pre.resize) == (32, 40)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (46, 70, 3), np.uint8))
    view, cam = explain(pred, image, target=1)
    assert view.size == (70, 46) and cam.shape == (46, 70)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(image))
    seen = np.isfinite(cam)
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (5, 40, 17, 52)
    assert seen[5:41, 17:53].all() and seen.sum() == 36 * 36
    model = explain(pred, image, target=1, frame="model")[1]
    np.testing.assert_allclose(cam[5:41, 17:53].mean(), model.mean(), atol=0.05)
    with pytest.raises(UserError, match="frame"):
        explain(pred, image, frame="crop")
