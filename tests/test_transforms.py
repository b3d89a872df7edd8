"""HED stain jitter, the per-image train/eval pipelines and dihedral TTA."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

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
    Preprocessing,
    RandomRot90,
    TransformConfigError,
    build_eval_transform,
    build_train_transform,
    denormalize,
    dihedral,
    dihedral_inverse,
)

# Small sizes keep the whole file fast on two cores (test_batch_augment.py uses them too).
PRE = Preprocessing(size=32, resize=40)


def _rand_images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 + 0.95 * torch.rand(*shape, generator=g)


def tissue_pil(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
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


def test_hed_jitter_is_scaled_and_shifted_stains_and_back():
    """The one-step map equals the definition: to stains, alpha * c + beta, back to RGB."""
    x = _rand_images(2, 3, 16, 16).double()
    out = hed_jitter(x, sigma=0.2, bias=0.1, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    alpha = 0.8 + 0.4 * torch.rand((2, 3), generator=g, dtype=torch.float64)
    beta = -0.1 + 0.2 * torch.rand((2, 3), generator=g, dtype=torch.float64)
    expected = hed_to_rgb(rgb_to_hed(x) * alpha[..., None, None] + beta[..., None, None])
    torch.testing.assert_close(out, expected.clamp(0, 1), atol=1e-9, rtol=0)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hed_jitter_draws_in_the_images_precision(dtype):
    # float64 images get float64 draws: other numbers than float32 draws from the same seed,
    # which BatchAugment makes for every input (test_batch_augment.py checks that side).
    x = _rand_images(2, 3, 8, 8).to(dtype)
    out = hed_jitter(x, sigma=0.3, bias=0.3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    alpha = 0.7 + 0.6 * torch.rand((2, 3, 1, 1), generator=g, dtype=dtype)
    beta = -0.3 + 0.6 * torch.rand((2, 3, 1, 1), generator=g, dtype=dtype)
    ref = hed_to_rgb(rgb_to_hed(x) * alpha + beta).clamp(0.0, 1.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


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


def unnormalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
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
    raw = unnormalize(jittered, PRE)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_train_transform_without_crop_sees_the_whole_image():
    img = tissue_pil(96, 96)
    plain = build_eval_transform(pre=Preprocessing(size=32, resize=None))(img)
    out = build_train_transform(pre=PRE, aug=Augmentation(crop=False, flips=False, rot90=False,
                                                          color_jitter=0.0, hue=0.0,
                                                          hed=0.0))(img)
    torch.testing.assert_close(out, plain)


def test_train_transform_rotates_by_quarter_turns():
    img = tissue_pil(48, 48)
    tr = build_train_transform(pre=PRE, aug=Augmentation(crop=False, flips=False,
                                                         color_jitter=0.0, hue=0.0, hed=0.0))
    upright = build_eval_transform(pre=Preprocessing(size=32, resize=None))(img)
    torch.manual_seed(0)
    seen = {_key(tr(img)) for _ in range(32)}
    assert seen == {_key(torch.rot90(upright, k, (-2, -1))) for k in range(4)}


def test_eval_is_deterministic_and_train_is_random():
    img = tissue_pil()
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
    img = tissue_pil()
    ev = build_eval_transform(pre=PRE)
    tr = build_train_transform(pre=PRE, aug=Augmentation())
    ev2 = pickle.loads(pickle.dumps(ev))
    tr2 = pickle.loads(pickle.dumps(tr))
    assert torch.equal(ev2(img), ev(img))
    assert tr2(img).shape == (3, 32, 32)
    # The batched modules' pickling is tested in test_batch_augment.py.
    for module in (HEDJitter(), RandomRot90()):
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


def test_colour_jitter_is_torchvisions_arithmetic_in_a_fixed_order():
    import torchvision.transforms.v2.functional as TF

    from breast_cancer_detection.data.transforms import RandomColour

    x = torch.rand(3, 20, 24)
    x0 = x.clone()
    torch.manual_seed(3)
    out = RandomColour(0.3, 0.0)(x)
    torch.manual_seed(3)
    b, c, s = (0.7 + 0.6 * torch.rand(3)).tolist()
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
    # torchvision weighs red 0.2989, not 0.299: within 1e-4.
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert not torch.equal(out, x) and torch.equal(x, x0)  # the input is left alone
    # A jitter over 1 floors the factors at 0, as ColorJitter does: contrast 0 gives a flat
    # image (a negative factor would invert it instead).
    real_rand = torch.rand
    torch.rand = lambda *a, **k: torch.tensor([0.4, 0.0, 0.4])
    try:
        flat = RandomColour(1.5, 0.0)(x)
    finally:
        torch.rand = real_rand
    assert float(flat.std()) < 1e-6

    grey = torch.full((3, 8, 8), 0.4)
    torch.testing.assert_close(RandomColour(0.0, 0.5)(grey), grey, atol=1e-5, rtol=0)
    tinted = torch.tensor([0.6, 0.3, 0.3]).view(3, 1, 1).expand(3, 8, 8)
    torch.manual_seed(0)
    turned = [RandomColour(0.0, 0.25)(tinted) for _ in range(20)]
    assert max(float((t - tinted).abs().max()) for t in turned) > 0.05
    assert all(0 <= t.min() <= t.max() <= 1 for t in turned)
