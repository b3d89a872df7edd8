"""HED stain jitter, the train/eval pipelines, their batched GPU versions and dihedral TTA."""

from __future__ import annotations

import dataclasses
import itertools
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
import yaml
from PIL import Image
from torchvision.ops import roi_align

import breast_cancer_detection.data.transforms as transforms_module
from breast_cancer_detection.data.stain import (
    _RGB_FROM_HED,
    HEDJitter,
    hed_jitter,
    hed_to_rgb,
    rgb_to_hed,
)
from breast_cancer_detection.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    BatchAugment,
    BatchEval,
    Preprocessing,
    RandomRot90,
    TransformConfigError,
    _affine_grid,
    _crop_boxes,
    build_eval_transform,
    build_train_transform,
    denormalize,
    dihedral,
    dihedral_inverse,
)

# Small sizes keep the whole file fast on two cores.
PRE = Preprocessing(size=32, resize=40)
NO_AUG = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flips=False, rot90=False,
                      color_jitter=0.0, hue=0.0, hed=0.0)


def _rand_images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 + 0.95 * torch.rand(*shape, generator=g)


def _tissue_pil(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
    """A smooth pink/purple image with texture, so resizes and crops are visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([200 + 40 * np.sin(xx / 7), 120 + 60 * np.cos(yy / 5), 190 + 0 * xx], -1)
    noise = rng.normal(0, 10, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _haematoxylin_rgb(amount: float) -> torch.Tensor:
    return torch.exp(-amount * _RGB_FROM_HED[0].float())


# --------------------------------------------------------------------------------------------
# stain.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 17, 13), (4, 3, 16, 16)])
def test_hed_round_trip(shape):
    x = _rand_images(*shape)
    hed = rgb_to_hed(x)
    assert hed.shape == x.shape and hed.dtype == x.dtype
    torch.testing.assert_close(hed_to_rgb(hed), x, atol=1e-4, rtol=0)


def test_rgb_to_hed_separates_the_stains():
    # A pixel coloured by haematoxylin alone deconvolves to haematoxylin alone.
    pixel = _haematoxylin_rgb(0.8).view(3, 1, 1)
    hed = rgb_to_hed(pixel).flatten()
    torch.testing.assert_close(hed, torch.tensor([0.8, 0.0, 0.0]), atol=1e-4, rtol=0)
    # White is no stain at all, and black is finite.
    assert rgb_to_hed(torch.ones(3, 2, 2)).abs().max() < 1e-5
    assert torch.isfinite(rgb_to_hed(torch.zeros(3, 2, 2))).all()


def test_hed_jitter_zero_strength_is_identity():
    x = _rand_images(2, 3, 16, 16)
    x[0, :, 0, 0] = 0.0  # the epsilon keeps black pixels exact too
    x[0, :, 0, 1] = 1.0
    torch.testing.assert_close(hed_jitter(x, sigma=0.0, bias=0.0), x, atol=1e-4, rtol=0)


def test_hed_jitter_changes_the_image_and_is_reproducible():
    x = _rand_images(3, 16, 16)
    a = hed_jitter(x, sigma=0.1, bias=0.1, generator=torch.Generator().manual_seed(1))
    b = hed_jitter(x, sigma=0.1, bias=0.1, generator=torch.Generator().manual_seed(1))
    c = hed_jitter(x, sigma=0.1, bias=0.1, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert (a - x).abs().mean() > 1e-3
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(("sigma", "bias"), [(0.1, 0.0), (0.0, 0.1)])
def test_batched_hed_jitter_draws_per_image(sigma, bias):
    x = _rand_images(3, 16, 16).expand(4, 3, 16, 16)
    out = hed_jitter(x, sigma=sigma, bias=bias, generator=torch.Generator().manual_seed(0))
    for i, j in itertools.combinations(range(4), 2):
        assert not torch.allclose(out[i], out[j], atol=1e-4), (i, j)


def test_hed_jitter_stays_in_range_on_haematoxylin_and_white():
    img = _haematoxylin_rgb(2.0).view(3, 1, 1).expand(3, 8, 8).clone()
    img[:, :, :4] = 1.0  # white background: a negative bias pushes it above 1 before clamping
    out = hed_jitter(img.expand(16, 3, 8, 8), sigma=0.5, bias=0.5,
                     generator=torch.Generator().manual_seed(0))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - img).abs().max() > 0.05


def test_hed_jitter_keeps_dtype_for_half_precision():
    x = _rand_images(2, 3, 8, 8).to(torch.bfloat16)
    out = hed_jitter(x, sigma=0.0, bias=0.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.float(), atol=1e-2, rtol=0)


def test_hed_jitter_module_probability():
    x = _rand_images(3, 16, 16).expand(32, 3, 16, 16)
    torch.manual_seed(0)
    assert torch.equal(HEDJitter(p=0.0)(x), x)
    out = HEDJitter(sigma=0.2, bias=0.2, p=0.5)(x)
    unchanged = (out - x).flatten(1).abs().amax(1) < 1e-6
    # With 32 images at p=0.5 both kinds occur (probability 1 - 2**-31).
    assert 0 < int(unchanged.sum()) < 32
    single = HEDJitter(sigma=0.2, bias=0.2)(x[0])
    assert single.shape == (3, 16, 16) and (single - x[0]).abs().mean() > 1e-3


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def _plain_types_only(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_types_only(v) for v in value)
    return value is None or type(value) in (int, float, bool, str)


@pytest.mark.parametrize("obj", [
    Preprocessing(),
    Preprocessing(size=96, resize=None, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4)),
    Augmentation(),
    Augmentation(scale=(0.5, 0.9), flips=False, hed=0.0, crop=False),
])
def test_settings_dict_round_trip_with_plain_types(obj, tmp_path):
    d = obj.to_dict()
    assert _plain_types_only(d), d
    assert type(obj).from_dict(d) == obj
    # Plain types are what YAML and torch.load(weights_only=True) accept.
    assert type(obj).from_dict(yaml.safe_load(yaml.safe_dump(d))) == obj
    torch.save({"pre": d}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["pre"] == d


def test_settings_reject_unknown_keys_and_bad_values():
    with pytest.raises(TransformConfigError, match="colour_jitter"):
        Augmentation.from_dict({"colour_jitter": 0.2})
    with pytest.raises(TransformConfigError, match="resize"):
        Preprocessing(size=224, resize=200)
    with pytest.raises(TransformConfigError, match="scale"):
        Augmentation(scale=(0.0, 1.0))
    assert Augmentation.from_dict({"hed": 0}) == Augmentation(hed=0.0)


# --------------------------------------------------------------------------------------------
# Per-image pipelines
# --------------------------------------------------------------------------------------------


def _unnormalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Like denormalize but without its clamp, so out-of-range values show."""
    return x * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)


def _expected_constant(rgb: tuple[int, int, int], pre: Preprocessing) -> torch.Tensor:
    c = torch.tensor(rgb, dtype=torch.float32) / 255
    mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
    return ((c - mean) / std).view(3, 1, 1).expand(3, pre.size, pre.size)


@pytest.mark.parametrize("pre", [PRE, Preprocessing(size=32, resize=None)])
def test_eval_transform_shape_and_normalisation(pre):
    rgb = (200, 120, 180)
    out = build_eval_transform(pre=pre)(Image.new("RGB", (70, 46), rgb))
    assert type(out) is torch.Tensor
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected_constant(rgb, pre), atol=1e-5, rtol=0)


def test_train_transform_shape_and_normalisation():
    rgb = (200, 120, 180)
    img = Image.new("RGB", (70, 46), rgb)
    out = build_train_transform(pre=PRE, aug=Augmentation(color_jitter=0.0, hue=0.0,
                                                          hed=0.0))(img)
    assert type(out) is torch.Tensor
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Geometry alone cannot change a flat colour.
    torch.testing.assert_close(out, _expected_constant(rgb, PRE), atol=1e-5, rtol=0)
    # Colour jitter and HED jitter do; the image stays within normalised [0, 1].
    jittered = build_train_transform(pre=PRE, aug=Augmentation(color_jitter=0.3, hed=0.1))(img)
    assert jittered.shape == (3, 32, 32)
    assert (jittered - out).abs().max() > 1e-2
    raw = _unnormalize(jittered, PRE)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_train_transform_without_crop_sees_the_whole_image():
    img = _tissue_pil(96, 96)
    plain = build_eval_transform(pre=Preprocessing(size=32, resize=None))(img)
    out = build_train_transform(pre=PRE, aug=Augmentation(crop=False, flips=False, rot90=False,
                                                          color_jitter=0.0, hue=0.0,
                                                          hed=0.0))(img)
    torch.testing.assert_close(out, plain)


def test_train_transform_rotates_by_quarter_turns():
    img = _tissue_pil(48, 48)
    tr = build_train_transform(pre=PRE, aug=Augmentation(crop=False, flips=False,
                                                         color_jitter=0.0, hue=0.0, hed=0.0))
    upright = build_eval_transform(pre=Preprocessing(size=32, resize=None))(img)
    torch.manual_seed(0)
    seen = {_key(tr(img)) for _ in range(32)}
    assert seen == {_key(torch.rot90(upright, k, (-2, -1))) for k in range(4)}


def test_eval_is_deterministic_and_train_is_random():
    img = _tissue_pil()
    ev = build_eval_transform(pre=PRE)
    torch.manual_seed(0)
    a = ev(img)
    torch.manual_seed(1)
    assert torch.equal(a, ev(img))

    tr = build_train_transform(pre=PRE, aug=Augmentation())
    torch.manual_seed(0)
    t0 = tr(img)
    torch.manual_seed(1)
    t1 = tr(img)
    torch.manual_seed(0)
    t0_again = tr(img)
    assert not torch.allclose(t0, t1, atol=1e-3)
    assert torch.equal(t0, t0_again)


def test_transforms_pickle():
    img = _tissue_pil()
    ev = build_eval_transform(pre=PRE)
    tr = build_train_transform(pre=PRE, aug=Augmentation())
    ev2 = pickle.loads(pickle.dumps(ev))
    tr2 = pickle.loads(pickle.dumps(tr))
    assert torch.equal(ev2(img), ev(img))
    assert tr2(img).shape == (3, 32, 32)
    for module in (BatchAugment(pre=PRE, aug=Augmentation()), BatchEval(pre=PRE), HEDJitter(),
                   RandomRot90()):
        assert isinstance(pickle.loads(pickle.dumps(module)), type(module))


def test_random_rot90_covers_all_quarter_turns():
    x = torch.arange(16.0).view(1, 4, 4)
    torch.manual_seed(0)
    seen = {tuple(RandomRot90()(x).flatten().tolist()) for _ in range(64)}
    expected = {tuple(torch.rot90(x, k, (-2, -1)).flatten().tolist()) for k in range(4)}
    assert seen == expected
    pil = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    sizes = {RandomRot90()(pil).size for _ in range(32)}
    assert sizes == {(4, 3), (3, 4)}


def test_denormalize_inverts_normalisation():
    x = _rand_images(2, 3, 8, 8)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(denormalize((x - mean) / std, Preprocessing()), x)
    # Out-of-range values (from colour jitter before clamping, say) are clipped for plotting.
    extreme = denormalize(torch.tensor([-9.0, 0.0, 9.0]).view(3, 1, 1), Preprocessing())
    assert extreme.flatten().tolist() == pytest.approx([0.0, IMAGENET_MEAN[1], 1.0])


# --------------------------------------------------------------------------------------------
# Dihedral test-time augmentation
# --------------------------------------------------------------------------------------------


def _key(t: torch.Tensor) -> tuple:
    return tuple(t.flatten().tolist())


def test_dihedral_gives_eight_distinct_invertible_results():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert all(o.shape == x.shape for o in outs)
    assert len({_key(o) for o in outs}) == 8
    for k, o in enumerate(outs):
        assert torch.equal(dihedral(o, dihedral_inverse(k)), x), k
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_dihedral_is_the_group_of_rotations_and_flips():
    x = torch.arange(9.0).view(3, 3)
    # Everything reachable from x by quarter turns and left-right / up-down flips.
    moves = (lambda t: torch.rot90(t, 1, (-2, -1)), lambda t: t.flip(-1), lambda t: t.flip(-2))
    reached, frontier = {_key(x): x}, [x]
    while frontier:
        nxt = []
        for t in frontier:
            for move in moves:
                u = move(t)
                if _key(u) not in reached:
                    reached[_key(u)] = u
                    nxt.append(u)
        frontier = nxt
    ours = {_key(dihedral(x, k)) for k in range(8)}
    assert ours == set(reached)
    # Closed under composition.
    assert {_key(dihedral(dihedral(x, a), b)) for a in range(8) for b in range(8)} == ours


# --------------------------------------------------------------------------------------------
# Batched pipelines
# --------------------------------------------------------------------------------------------


def _uint8_batch(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    imgs = [torch.from_numpy(np.array(_tissue_pil(h, w, seed + i))).permute(2, 0, 1)
            for i in range(n)]
    return torch.stack(imgs)


def test_batch_augment_shape_dtype_device_and_randomness():
    x = _uint8_batch(1, 60, 80).expand(6, 3, 60, 80)
    out = BatchAugment(pre=PRE, aug=Augmentation())(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.device == x.device
    assert torch.isfinite(out).all()
    for i, j in itertools.combinations(range(6), 2):
        assert not torch.allclose(out[i], out[j], atol=1e-3), (i, j)
    raw = _unnormalize(out, PRE)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # .to() as the engine moves it (nn.Module.to must still find its own _apply).
    again = BatchAugment(pre=PRE, aug=Augmentation()).to("cpu")(
        x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def _normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    return (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)


def test_batch_augment_crops_differ_per_sample():
    x = _uint8_batch(1, 64, 64).expand(5, 3, 64, 64)
    aug = Augmentation(flips=False, rot90=False, color_jitter=0.0, hue=0.0, hed=0.0)
    out = BatchAugment(pre=PRE, aug=aug)(x, torch.Generator().manual_seed(0))
    for i, j in itertools.combinations(range(5), 2):
        assert not torch.allclose(out[i], out[j], atol=1e-3), (i, j)


@pytest.mark.parametrize("hw", [(60, 80), (24, 30)])  # shrinking, and enlarging to the edges
def test_batch_augment_grid_crop_is_each_images_own_box_resampled(hw):
    x = _uint8_batch(6, *hw)
    aug = Augmentation(flips=False, rot90=False, color_jitter=0.0, hue=0.0, hed=0.0)
    out = BatchAugment(pre=PRE, aug=aug, resample="grid")(x, torch.Generator().manual_seed(3))
    # The crop boxes are the first draws, so the same seed gives the same boxes.
    boxes = _crop_boxes(6, *hw, aug.scale, aug.ratio, x, torch.Generator().manual_seed(3))
    assert len({tuple(b.tolist()) for b in boxes}) == 6
    # An independent resampler: roi_align with one sample per bin is bilinear interpolation
    # at each output pixel's centre inside the box, edge pixels repeated outwards.
    index = torch.arange(6, dtype=torch.float32)[:, None]
    ref = roi_align(x.float() / 255, torch.cat([index, boxes], 1), output_size=(32, 32),
                    spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(out, _normalize(ref, PRE), atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(60, 80), (24, 30)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_augment_cpu_crop_is_torchvisions_resized_crop_of_the_rounded_box(hw, layout):
    x = _uint8_batch(6, *hw)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    aug = Augmentation(flips=False, rot90=False, color_jitter=0.0, hue=0.0, hed=0.0)
    out = BatchAugment(pre=PRE, aug=aug, resample="crop")(x, torch.Generator().manual_seed(3))
    boxes = _crop_boxes(6, *hw, aug.scale, aug.ratio, x, torch.Generator().manual_seed(3))
    ref = []
    for img, (x1, y1, x2, y2) in zip(x, boxes.round().long().tolist()):
        ref.append(TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [32, 32], antialias=True))
    ref = torch.stack(ref).float() / 255
    # Both round the same antialiased resize to uint8: at most one level apart.
    torch.testing.assert_close(out, _normalize(ref, PRE), atol=1.01 / 255 / min(PRE.std),
                               rtol=0)


def test_batch_augment_cpu_crop_and_grid_give_the_same_symmetry_for_the_same_draws():
    # Same-size source, no crop: both resamplers copy pixels, so any difference would be a
    # flip or a turn applied differently.
    x = _uint8_batch(16, 32, 32)
    aug = dataclasses.replace(NO_AUG, flips=True, rot90=True, color_jitter=0.2, hue=0.05,
                              hed=0.05)
    grid = BatchAugment(pre=PRE, aug=aug, resample="grid")(x, torch.Generator().manual_seed(5))
    crop = BatchAugment(pre=PRE, aug=aug, resample="crop")(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(crop, grid, atol=1e-4, rtol=0)
    with pytest.raises(TransformConfigError, match="resample"):
        BatchAugment(pre=PRE, aug=aug, resample="nearest")


def test_batch_augment_picks_the_resampler_by_device():
    batch_aug = BatchAugment(pre=PRE, aug=Augmentation())
    assert batch_aug._resampler(torch.empty(1, 3, 4, 4)) == "crop"
    assert batch_aug._resampler(torch.empty(1, 3, 4, 4, device="meta")) == "grid"
    assert BatchAugment(pre=PRE, aug=Augmentation(), resample="grid")._resampler(
        torch.empty(1, 3, 4, 4)) == "grid"


@pytest.mark.parametrize("resample", ["grid", "crop"])
@pytest.mark.parametrize(("flips", "rot90", "reached"), [
    (True, True, set(range(8))),
    (True, False, {0, 2, 4, 6}),  # identity, half turn, left-right and up-down mirrors
    (False, True, {0, 1, 2, 3}),  # the quarter turns
])
def test_batch_augment_geometry_is_a_dihedral_image_of_the_resized_input(flips, rot90, reached,
                                                                         resample):
    # scale 1 and the image's own aspect ratio: every crop is the whole 48 x 64 image.
    x = _uint8_batch(1, 48, 64)
    aug = dataclasses.replace(NO_AUG, ratio=(64 / 48, 64 / 48), flips=flips, rot90=rot90)
    out = BatchAugment(pre=PRE, aug=aug, resample=resample)(x.expand(48, 3, 48, 64),
                                                            torch.Generator().manual_seed(1))
    if resample == "grid":  # plain bilinear taps
        resized = F.interpolate(x.float() / 255, size=(32, 32), mode="bilinear",
                                align_corners=False, antialias=False)
    else:  # the antialiased resize of the uint8 pixels
        resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False,
                                antialias=True).float() / 255
    symmetries = [_normalize(dihedral(resized[0], k), PRE) for k in range(8)]
    which = []
    for o in out:
        errors = [float((o - s).abs().max()) for s in symmetries]
        k = min(range(8), key=errors.__getitem__)
        assert errors[k] < 1e-4, errors  # float rounding of the sampling grid only
        which.append(k)
    assert set(which) == reached


def test_batch_augment_is_deterministic_for_a_seed_and_chunk_size(monkeypatch):
    x = _uint8_batch(5, 60, 80)
    batch_aug = BatchAugment(pre=PRE, aug=Augmentation())
    a = batch_aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, batch_aug(x, torch.Generator().manual_seed(7)))
    assert not torch.allclose(a, batch_aug(x, torch.Generator().manual_seed(8)), atol=1e-3)
    # The CPU works through a batch a few images at a time; how many must not matter.
    monkeypatch.setattr(transforms_module, "_CPU_CHUNK_ELEMENTS", 2 * 3 * 60 * 80)
    torch.testing.assert_close(batch_aug(x, torch.Generator().manual_seed(7)), a,
                               atol=1e-6, rtol=0)
    # None draws from the global generator.
    torch.manual_seed(7)
    b = batch_aug(x)
    torch.manual_seed(7)
    assert torch.equal(b, batch_aug(x))


@pytest.mark.parametrize("resample", ["grid", "crop"])
def test_batch_augment_uint8_and_float_input_agree(resample):
    x = _uint8_batch(4, 60, 80)
    batch_aug = BatchAugment(pre=PRE, aug=Augmentation(), resample=resample)
    from_uint8 = batch_aug(x, torch.Generator().manual_seed(0))
    from_float = batch_aug(x.float() / 255, torch.Generator().manual_seed(0))
    # The CPU crop path resizes uint8 input in uint8 (one level of rounding), which colour
    # jitter's gains of up to 1.1 can stretch a little.
    atol = 1e-4 if resample == "grid" else 1.5 / 255 / min(PRE.std)
    torch.testing.assert_close(from_uint8, from_float, atol=atol, rtol=0)
    with pytest.raises(TypeError):
        batch_aug(x.to(torch.int32))
    with pytest.raises(ValueError):
        batch_aug(x[:, :2])


def test_batch_augment_output_statistics_are_sane():
    x = _uint8_batch(1, 60, 80).expand(64, 3, 60, 80)
    out = BatchAugment(pre=PRE, aug=Augmentation())(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    raw = _unnormalize(out, PRE)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Jitter moves each image's colour a little around the source's, not away from it.
    source = x[0].float().mean(dim=(1, 2)) / 255
    per_image = raw.mean(dim=(2, 3))
    assert (per_image.mean(0) - source).abs().max() < 0.03
    assert 0.005 < per_image.std(0).min() and per_image.std(0).max() < 0.1
    # Texture survives: the geometry resamples, it does not blur everything flat.
    source_texture = (x[0].float() / 255).std(dim=(1, 2))
    assert (raw.std(dim=(2, 3)).mean(0) > 0.5 * source_texture).all()


def test_batch_colour_jitter_matches_torchvision_per_image():
    x = _uint8_batch(4, 32, 32)
    aug = dataclasses.replace(NO_AUG, color_jitter=0.4)
    batch_aug = BatchAugment(pre=PRE, aug=aug)
    out = batch_aug(x, torch.Generator().manual_seed(0))
    draws = batch_aug._draw(x, torch.Generator().manual_seed(0))
    for img, gain, contrast, saturation, o in zip(x, draws.gain, draws.contrast,
                                                  draws.saturation, out):
        ref = img.float() / 255
        ref = TF.adjust_brightness(ref, float(gain * 255))
        ref = TF.adjust_contrast(ref, float(contrast))
        ref = TF.adjust_saturation(ref, float(saturation))
        # torchvision's grey weighs red 0.2989 rather than 0.299.
        torch.testing.assert_close(o, _normalize(ref, PRE), atol=2e-3, rtol=0)


def test_batch_hed_jitter_matches_stain_hed_jitter():
    x = _uint8_batch(4, 32, 32)
    aug = dataclasses.replace(NO_AUG, crop=False, hed=0.2)
    out = BatchAugment(pre=PRE, aug=aug)(x, torch.Generator().manual_seed(0))
    # With every other augmentation off, the HED draws are the only draws, made in
    # hed_jitter's order.
    ref = hed_jitter(x.float() / 255, sigma=0.2, bias=0.2,
                     generator=torch.Generator().manual_seed(0))
    assert (ref - x.float() / 255).abs().mean() > 1e-2
    torch.testing.assert_close(out, _normalize(ref, PRE), atol=1e-4, rtol=0)


class _AugmentInWorker:
    """A collate function that augments the batch in the DataLoader worker, as a CPU-only
    training run can."""

    def __init__(self, batch_aug: BatchAugment):
        self.batch_aug = batch_aug

    def __call__(self, items: list) -> tuple[torch.Tensor, bool]:
        out = self.batch_aug(torch.stack(items), torch.Generator().manual_seed(0))
        return out, out.is_shared()


def test_batch_augment_in_a_dataloader_worker():
    x = _uint8_batch(4, 60, 80)
    batch_aug = BatchAugment(pre=PRE, aug=Augmentation())
    loader = torch.utils.data.DataLoader(list(x), batch_size=4, num_workers=1,
                                         collate_fn=_AugmentInWorker(batch_aug))
    (out, shared), = list(loader)
    # Made in shared memory, so the trip to the main process copies nothing; same result.
    assert shared
    assert torch.equal(out, batch_aug(x, torch.Generator().manual_seed(0)))


def test_affine_grid_matches_torch():
    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_affine_grid(theta, 7),
                               F.affine_grid(theta, (3, 3, 7, 7), align_corners=False))


@pytest.mark.gpu
def test_batch_augment_on_cuda_matches_cpu():
    x = _uint8_batch(4, 60, 80)
    # The GPU's default resampler, also on the CPU for the comparison.
    batch_aug = BatchAugment(pre=PRE, aug=Augmentation(), resample="grid")
    on_gpu = batch_aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (4, 3, 32, 32)
    assert torch.equal(on_gpu, batch_aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0)))
    # The same draws give the same images on either device.
    draws = batch_aug._draw(x, torch.Generator().manual_seed(0))
    cpu = torch.empty(4, 3, 32, 32)
    batch_aug._augment(x, draws, cpu)
    gpu = torch.empty(4, 3, 32, 32, device="cuda")
    batch_aug._augment(x.cuda(), type(draws)(*(None if t is None else t.cuda() for t in draws)),
                     gpu)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = _crop_boxes(500, 60, 80, (0.35, 1.0), (3 / 4, 4 / 3), torch.empty(0), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80 + 1e-4).all()
    assert (boxes[:, 3] <= 60 + 1e-4).all()
    area = w * h / (60 * 80)
    assert area.min() >= 0.35 - 1e-4 and area.max() <= 1 + 1e-4
    assert area.std() > 0.1
    # A ratio range the image cannot fit falls back to the centre crop at the nearest ratio.
    boxes = _crop_boxes(4, 20, 100, (0.9, 1.0), (1.0, 1.0), torch.empty(0), g)
    torch.testing.assert_close(boxes, torch.tensor([[40.0, 0.0, 60.0, 20.0]]).expand(4, 4))


def test_batch_augment_flips_and_turns_reach_all_eight_symmetries():
    x = _uint8_batch(1, 32, 32)
    aug = dataclasses.replace(NO_AUG, flips=True, rot90=True)
    out = BatchAugment(pre=PRE, aug=aug)(x.expand(64, 3, 32, 32), torch.Generator().manual_seed(0))
    upright = BatchEval(pre=Preprocessing(size=32, resize=None))(x)[0]
    symmetries = [dihedral(upright, k) for k in range(8)]
    which = [min(range(8), key=lambda k, o=o: (o - symmetries[k]).abs().max()) for o in out]
    for o, k in zip(out, which):
        torch.testing.assert_close(o, symmetries[k], atol=1e-5, rtol=0)
    assert set(which) == set(range(8))


def test_batch_augment_with_augmentation_off_is_a_resize():
    x = _uint8_batch(3, 32, 32)
    mean = torch.tensor(PRE.mean).view(3, 1, 1)
    std = torch.tensor(PRE.std).view(3, 1, 1)
    same_size = BatchAugment(pre=PRE, aug=NO_AUG)(x)
    torch.testing.assert_close(same_size, (x / 255 - mean) / std, atol=1e-5, rtol=0)

    big = _uint8_batch(3, 64, 64)
    down = BatchAugment(pre=PRE, aug=NO_AUG)(big)
    ref = BatchEval(pre=Preprocessing(size=32, resize=None))(big)
    assert (down - ref).abs().mean() < 0.05
    # crop=False resizes the whole (non-square) image whatever scale and ratio say.
    wide = _uint8_batch(2, 40, 64)
    no_crop = BatchAugment(pre=PRE, aug=Augmentation(crop=False, flips=False, rot90=False,
                                                     color_jitter=0.0, hue=0.0, hed=0.0))(wide)
    ref = BatchEval(pre=Preprocessing(size=32, resize=None))(wide)
    assert (no_crop - ref).abs().mean() < 0.05


def test_batch_augment_colour_on_grey_and_float_input():
    grey = torch.full((4, 3, 32, 32), 0.5)
    aug = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0, hue=0.5, hed=0.0)
    out = denormalize(BatchAugment(pre=PRE, aug=aug)(grey), PRE)
    # A hue rotation leaves grey alone.
    torch.testing.assert_close(out, grey, atol=1e-5, rtol=0)
    aug = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.5, hue=0.0, hed=0.0)
    out = denormalize(BatchAugment(pre=PRE, aug=aug)(grey, torch.Generator().manual_seed(0)),
                      PRE)
    levels = out.mean(dim=(1, 2, 3))
    assert levels.std() > 0.01  # brightness differs per image


@pytest.mark.parametrize("pre", [PRE, Preprocessing(size=32, resize=None),
                                 Preprocessing(size=32, resize=48)])
@pytest.mark.parametrize("hw", [(60, 80), (80, 60)])
def test_batch_eval_matches_eval_transform(pre, hw):
    x = _uint8_batch(2, *hw)
    batched = BatchEval(pre=pre)(x)
    ev = build_eval_transform(pre=pre)
    single = torch.stack([ev(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])
    assert batched.shape == single.shape == (2, 3, 32, 32)
    # PIL works in uint8, so the two differ by about one grey level at most.
    diff = (batched - single).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1
