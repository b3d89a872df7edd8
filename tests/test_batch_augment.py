"""The batched train/eval pipelines (whole batches on a device) against the per-image ones."""

from __future__ import annotations

import dataclasses
import itertools
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.ops import roi_align

import breast_cancer_detection.data.batch_augment as batch_augment_module
from breast_cancer_detection.data.batch_augment import (
    BatchAugment,
    BatchEval,
    _affine_grid,
    _crop_boxes,
    random_windows,
)
from breast_cancer_detection.data.stain import hed_jitter
from breast_cancer_detection.data.transforms import (
    Augmentation,
    Preprocessing,
    TransformConfigError,
    build_eval_transform,
    denormalize,
    dihedral,
)
from test_transforms import PRE, tissue_pil, unnormalize

NO_AUG = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flips=False, rot90=False,
                      color_jitter=0.0, hue=0.0, hed=0.0)


def _uint8_batch(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    imgs = [torch.from_numpy(np.array(tissue_pil(h, w, seed + i))).permute(2, 0, 1)
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
    raw = unnormalize(out, PRE)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # .to() as the engine moves it (nn.Module.to must still find its own _apply).
    again = BatchAugment(pre=PRE, aug=Augmentation()).to("cpu")(
        x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def _normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    return (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)


def test_batch_modules_pickle():
    # DataLoader workers started by spawn receive a collate that holds these by pickling.
    for module in (BatchAugment(pre=PRE, aug=Augmentation()), BatchEval(pre=PRE)):
        again = pickle.loads(pickle.dumps(module))
        assert isinstance(again, type(module)) and again.pre == module.pre


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
    monkeypatch.setattr(batch_augment_module, "_CPU_CHUNK_ELEMENTS", 2 * 3 * 60 * 80)
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


def test_batch_augment_draws_in_float32_whatever_the_input_dtype():
    # Unlike stain.hed_jitter, which draws in the images' own precision: float64 draws would
    # give a float64 batch other crops and colours than its float32 copy.
    x = _uint8_batch(4, 60, 80).float() / 255
    batch_aug = BatchAugment(pre=PRE, aug=Augmentation(), resample="grid")
    from_float32 = batch_aug(x, torch.Generator().manual_seed(0))
    from_float64 = batch_aug(x.double(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_float64, from_float32, atol=1e-5, rtol=0)


def test_batch_augment_output_statistics_are_sane():
    x = _uint8_batch(1, 60, 80).expand(64, 3, 60, 80)
    out = BatchAugment(pre=PRE, aug=Augmentation())(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    raw = unnormalize(out, PRE)
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


def _windows(x: torch.Tensor, side: int) -> list[torch.Tensor]:
    """Every ``side`` x ``side`` window of one ``(C, H, W)`` image."""
    return [x[:, t:t + side, left:left + side] for t in range(x.shape[1] - side + 1)
            for left in range(x.shape[2] - side + 1)]


def test_random_windows_cut_each_image_at_its_own_scale():
    x = _uint8_batch(16, 12, 10).contiguous(memory_format=torch.channels_last)
    out = random_windows(x, 6, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 6, 6) and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)
    places = []
    for img, win in zip(x, out):
        hits = [i for i, w in enumerate(_windows(img, 6)) if torch.equal(w, win)]
        assert hits, "every output is an exact window of its own image"
        places.append(hits[0])
    assert len(set(places)) > 4  # drawn per image, not one place for the batch
    again = random_windows(x, 6, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert random_windows(x, 12) is x  # no larger than the window: x itself, untouched
    with pytest.raises(TransformConfigError, match="does not fit"):
        random_windows(x, 11)


def test_batch_augment_with_a_window_augments_that_window_at_its_own_scale():
    """No colour: each output is one of the 8 symmetries of one window of its image."""
    aug = dataclasses.replace(NO_AUG, flips=True, rot90=True)
    x = _uint8_batch(8, 12, 12, seed=3)
    out = BatchAugment(pre=PRE, aug=aug)(x, torch.Generator().manual_seed(1), window=8)
    assert out.shape == (8, 3, 8, 8)
    for img, o in zip(x, out):
        got = (unnormalize(o, PRE) * 255).round()
        candidates = [dihedral(w.float(), k) for w in _windows(img, 8) for k in range(8)]
        assert any(torch.allclose(got, c, atol=0.51) for c in candidates)
    whole = BatchAugment(pre=PRE, aug=aug)(x, torch.Generator().manual_seed(1))
    assert whole.shape == (8, 3, PRE.size, PRE.size)  # no window: resized to size as before


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_normalize_batch_is_the_eval_transforms_normalisation_in_a_contiguous_tensor(layout):
    from breast_cancer_detection.data.batch_augment import normalize_batch

    x = _uint8_batch(5, 24, 30)
    if layout == "channels_last":  # what bcd slide hands over: a permuted NHWC batch
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    out = normalize_batch(x, PRE)
    assert out.dtype == torch.float32 and out.is_contiguous()
    # The eval transform's own steps, image by image: ToDtype(scale=True), then Normalize.
    ref = torch.stack([TF.normalize(TF.to_dtype(img, torch.float32, scale=True),
                                    list(PRE.mean), list(PRE.std)) for img in x])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(normalize_batch(x.float() / 255, PRE), ref, atol=2e-6, rtol=0)
