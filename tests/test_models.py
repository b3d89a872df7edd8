"""The model registry: names, heads, local weights, offline advice, frozen backbones."""

from __future__ import annotations

import pytest
import torch

from breast_cancer_detection.errors import UserError
from breast_cancer_detection.models import (
    PACKAGE_MODELS,
    TORCHVISION_MODELS,
    WeightsError,
    create_model,
    head_name,
    list_models,
)

from conftest import need_module


# convnext_tiny alone takes 2 s to build on two CPU cores: kept out of the fast loop.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "convnext_tiny" else n
    for n in TORCHVISION_MODELS + PACKAGE_MODELS + ("tiny", "small_cnn", "patch_cnn",
                                                    "patch_cnn_wide", "patch_cnn_centre")])
def test_every_model_builds_with_two_outputs(name):
    if name in PACKAGE_MODELS:
        need_module("efficientnet_lite_pytorch", 'pip install -e ".[imagenet]"')
    model = create_model(name, num_classes=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2)
    assert name in list_models()


def test_patch_cnn_centre_head_sees_the_middle_third_apart_from_the_whole():
    model = create_model("patch_cnn_centre", num_classes=2).eval()
    model.features = torch.nn.Identity()  # feed it a feature map directly
    channels = model.classifier.in_features // 2
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[0, 0] = 1.0  # channel 0, pooled over the whole map
        model.classifier.weight[1, channels] = 1.0  # channel 0, pooled over the middle third
        rim = torch.zeros(1, channels, 6, 6)
        rim[0, 0] = 1.0
        rim[0, 0, 2:4, 2:4] = 0.0  # 96 px patch at stride 16: centre 32 px = cells 2..3
        centre = torch.zeros(1, channels, 6, 6)
        centre[0, 0, 2:4, 2:4] = 9.0
        torch.testing.assert_close(model(rim), torch.tensor([[32 / 36, 0.0]]))
        torch.testing.assert_close(model(centre), torch.tensor([[1.0, 9.0]]))


def test_local_weights_load_into_backbone(tmp_path):
    torch.manual_seed(1)
    source = create_model("resnet18", num_classes=1000)  # an ImageNet-shaped state dict
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", num_classes=2, weights=path)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
    assert model.fc.out_features == 2
    fresh = create_model("resnet18", num_classes=2)
    assert not torch.equal(fresh.conv1.weight, source.conv1.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("tiny").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit"):
        create_model("resnet18", weights=path)


def test_offline_pretrained_names_the_way_out(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(WeightsError) as e:
        create_model("resnet18", pretrained=True)
    assert "--weights PATH" in str(e.value) and "--no-pretrained" in str(e.value)


def test_freeze_backbone_trains_only_the_head(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("densenet121", num_classes=1000).state_dict(), path)
    model = create_model("densenet121", weights=path, freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    assert head_name(model) == "classifier"


def test_freeze_early_keeps_the_first_blocks_and_lets_their_statistics_adapt(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("mobilenet_v2", num_classes=1000).state_dict(), path)
    model = create_model("mobilenet_v2", weights=path, freeze_early=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01,
                            weight_decay=0.05)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)),
                                             torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    frozen = [n for n, p in model.named_parameters() if n.startswith(("features.0.",
              "features.1.", "features.2.", "features.3."))]
    assert frozen and all(not model.get_parameter(n).requires_grad for n in frozen)
    assert all(model.get_parameter(n).grad is None for n in frozen)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    # BatchNorm statistics of the frozen blocks follow the new images.
    assert not torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"])
    # The blocks after them and the head train.
    later = "features.4.conv.0.0.weight"
    assert not torch.equal(before[later], after[later])
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])


@pytest.mark.parametrize("name, blocks, message", [
    ("resnet18", 2, "model.features"), ("mobilenet_v2", 19, "has 19 blocks")])
def test_freeze_early_refuses_what_it_cannot_freeze(name, blocks, message):
    with pytest.raises(UserError, match=message):
        create_model(name, freeze_early=blocks)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(Exception, match="unknown model 'resnet9000'"):
        create_model("resnet9000")


def test_none_kwargs_are_dropped():
    # A CLI default of None must not override the architecture's own default.
    model = create_model("efficientnet_b0", dropout=None)
    assert model.classifier[0].p == pytest.approx(0.2)
