"""A tiny synthetic data set in BreakHis's own layout, for trying the pipeline offline.

Its images are flat pink or purple noise, not tissue: they exercise indexing, the
patient-disjoint split, training, evaluation and reports in seconds (``bcd notebook --quick``,
the tests), and say nothing about any model's skill.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (subtype code, subtype folder, class, slide id, magnifications, images per magnification)
SYNTHETIC_SLIDES = [
    ("A", "adenosis", "benign", "14-22549AB", ("40", "100"), 3),
    ("A", "adenosis", "benign", "14-22549CD", ("40",), 2),
    ("F", "fibroadenoma", "benign", "14-25197", ("40", "400"), 3),
    ("PT", "phyllodes_tumor", "benign", "14-21998CD", ("40",), 3),
    ("TA", "tubular_adenoma", "benign", "14-3411F", ("40", "200"), 3),
    ("DC", "ductal_carcinoma", "malignant", "14-2523", ("40", "400"), 3),
    ("DC", "ductal_carcinoma", "malignant", "14-10926", ("40",), 3),
    ("LC", "lobular_carcinoma", "malignant", "14-12204", ("40", "100"), 3),
    ("MC", "mucinous_carcinoma", "malignant", "14-10147", ("40",), 3),
    ("PC", "papillary_carcinoma", "malignant", "14-9146", ("40", "400"), 3),
    ("DC", "ductal_carcinoma", "malignant", "14-17614", ("200",), 3),
    ("LC", "lobular_carcinoma", "malignant", "14-15570", ("40",), 3),
]
"""12 slide folders of 11 patients (``14-22549`` has two), 8 subtypes, 4 magnifications."""


def breakhis_relpath(code: str, folder: str, cls: str, slide: str, mag: str, seq: int) -> str:
    """The path of one image inside the BreakHis tarball, as the real data set names it."""
    letter = "M" if cls == "malignant" else "B"
    return (f"BreaKHis_v1/histology_slides/breast/{cls}/SOB/{folder}/SOB_{letter}_{code}_{slide}/"
            f"{mag}X/SOB_{letter}_{code}-{slide}-{mag}-{seq:03d}.png")


def write_tissue_png(path: Path, malignant: bool, rng: np.random.Generator,
                     size: tuple[int, int] = (70, 46)) -> None:
    """A small pink (benign) or darker purple (malignant) noise image, so that a model can
    learn the classes."""
    base = np.array([120, 60, 140]) if malignant else np.array([230, 170, 210])
    arr = base + rng.integers(-25, 25, size=(size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)


def write_synthetic_breakhis(dest: str | Path, *, seed: int = 0) -> Path:
    """Writes :data:`SYNTHETIC_SLIDES` as 70x46 px PNGs under ``dest`` and returns the
    ``BreaKHis_v1`` folder (what ``bcd index`` and ``bcd train --data`` take)."""
    root = Path(dest)
    rng = np.random.default_rng(seed)
    for code, folder, cls, slide, mags, n in SYNTHETIC_SLIDES:
        for mag in mags:
            for seq in range(1, n + 1):
                rel = breakhis_relpath(code, folder, cls, slide, mag, seq)
                write_tissue_png(root / rel, cls == "malignant", rng)
    return root / "BreaKHis_v1"
