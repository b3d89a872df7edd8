"""Index an image folder (BreakHis or any two-class ImageFolder) into one table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import UserError

CLASSES = ("benign", "malignant")
"""Class names, in the order of the model's outputs (index 1 = malignant = positive)."""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}

SUBTYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}

# Totals of the published BreakHis v1 (Spanhol et al. 2016), checked against every index.
BREAKHIS_TOTALS = {
    "images": 7909,
    "benign": 2480,
    "malignant": 5429,
    "magnification": {"40X": 1995, "100X": 2081, "200X": 2013, "400X": 1820},
    "slides": 82,
    "patients": 70,
}

INDEX_COLUMNS = [
    "path", "label", "target", "subtype", "patient", "slide", "magnification", "split",
]

# SOB_M_DC-14-2523-400-012.png: procedure, class, subtype - year - slide - magnification - seq.
_BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<sub>[A-Z]+)-(?P<year>\d+)-(?P<slide>\d+[A-Z]*)-(?P<mag>\d+)-(?P<seq>\d+)$"
)

# Folder names accepted as the two classes of a generic ImageFolder, lower-cased.
_CLASS_ALIASES = {
    "benign": 0, "0": 0, "negative": 0, "normal": 0, "neg": 0,
    "malignant": 1, "1": 1, "positive": 1, "tumor": 1, "tumour": 1, "pos": 1,
}
_SPLIT_ALIASES = {"train": "train", "valid": "val", "val": "val", "validation": "val",
                  "test": "test"}


class DatasetError(UserError, ValueError):
    """A data set on disk is missing, incomplete or laid out in a way we cannot read."""


@dataclass(frozen=True)
class BreakHisName:
    """What a BreakHis file name says about its image."""

    label: str
    subtype: str
    patient: str
    slide: str
    magnification: str


def parse_breakhis_name(name: str) -> BreakHisName | None:
    """Parses a BreakHis file name such as ``SOB_M_DC-14-2523-400-012.png``.

    The slide is the tarball's folder name (``SOB_B_A_14-22549AB``: one folder per patient
    folder and subtype, 82 in all); the patient id drops the subtype and the letter suffix
    (``14-22549``), because BreakHis files the same numeric id under several folders
    (``22549AB``, ``22549CD``, ``22549G``) and grouping by the bare number is the choice
    that cannot put one person's tissue on both sides of a split.

    Returns:
        The parsed fields, or None when the name is not a BreakHis name.
    """
    m = _BREAKHIS_NAME.match(Path(name).stem)
    if m is None or m["sub"] not in SUBTYPES:
        return None
    slide = f"SOB_{m['cls']}_{m['sub']}_{m['year']}-{m['slide']}"
    patient = f"{m['year']}-{m['slide'].rstrip('ABCDEFGHIJKLMNOPQRSTUVWXYZ')}"
    return BreakHisName(
        label=CLASSES[1] if m["cls"] == "M" else CLASSES[0],
        subtype=SUBTYPES[m["sub"]],
        patient=patient,
        slide=slide,
        magnification=f"{m['mag']}X",
    )


def _image_files(root: Path) -> tuple[list[Path], int]:
    """All image files under root (sorted), and how many other files were passed over."""
    images, others = [], 0
    for p in root.rglob("*"):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            others += 1
    images.sort()
    return images, others


def _class_of_folder(name: str, root: Path) -> int:
    try:
        return _CLASS_ALIASES[name.lower()]
    except KeyError:
        raise DatasetError(
            f"{root}: class folder '{name}' is not one of the two classes. Name the class folders "
            "benign/malignant (or 0/1, negative/positive, normal/tumor)."
        ) from None


def layout_split(path: str | Path) -> str:
    """The subset (``train``, ``val``, ``test``) that a pre-split layout gives an image, from
    its path relative to the data folder: a top folder of that name with at least a class
    folder below it (``valid/1/x.png`` -> ``val``); ``""`` for any other path."""
    parts = Path(path).parts
    return _SPLIT_ALIASES.get(parts[0].lower(), "") if len(parts) >= 3 else ""


def build_index(root: str | Path, *, group_by: str = "patient") -> pd.DataFrame:
    """Builds the index table of every image under ``root``.

    Three layouts are recognised, in this order:

    1. BreakHis: every image has a BreakHis file name (any folder layout that keeps the
       names works); label, subtype, patient, slide and magnification come from the name.
    2. Pre-split: ``root/{train,val|valid,test}/<class>/*``; the ``split`` column keeps it.
    3. ImageFolder: ``root/<class>/*``.

    Class folders must map to benign/malignant (also 0/1, negative/positive, normal/tumor).

    Args:
        root: Folder to index.
        group_by: ``"patient"`` (numeric BreakHis id, the default) or ``"slide"`` (the
            slide folder, e.g. ``SOB_B_A_14-22549AB``): what the ``patient`` column holds, and
            so what patient-level metrics count. Splits of BreakHis images keep each numeric
            id in one subset either way.

    Returns:
        A DataFrame with ``INDEX_COLUMNS``; paths are relative to ``root`` (POSIX style).

    Raises:
        DatasetError: the folder is missing, holds no images, or its layout is not one of the
            above; the message names the folder and the fix.
    """
    if group_by not in ("patient", "slide"):
        raise DatasetError(f"group_by must be 'patient' or 'slide', not {group_by!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: no such folder. Give the folder of a BreakHis copy or of an ImageFolder "
            "(ROOT/benign/*, ROOT/malignant/*), or get BreakHis with `bcd download --dest data`."
        )
    files, _ = _image_files(root)
    if not files:
        raise DatasetError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}). "
            "Give the folder that holds the images."
        )
    parsed = [parse_breakhis_name(p.name) for p in files]
    rows = []
    if all(n is not None for n in parsed):
        for p, n in zip(files, parsed):
            rel = p.relative_to(root)
            rows.append({
                "path": rel.as_posix(), "label": n.label,
                "target": CLASSES.index(n.label), "subtype": n.subtype,
                "patient": n.patient if group_by == "patient" else n.slide,
                "slide": n.slide, "magnification": n.magnification,
                "split": layout_split(rel),  # BreakHis names give the class
            })
    else:
        for p in files:
            rel = p.relative_to(root)
            parts = rel.parts
            if len(parts) == 3 and layout_split(rel):
                split, cls = layout_split(rel), parts[1]
            elif len(parts) == 2:
                split, cls = "", parts[0]
            else:
                raise DatasetError(
                    f"{root}: cannot tell the class of {rel}. Use BreakHis file names, or lay "
                    "the images out as ROOT/<class>/* or ROOT/{train,val,test}/<class>/*."
                )
            target = _class_of_folder(cls, root)
            n = parse_breakhis_name(p.name)
            rows.append({
                "path": rel.as_posix(), "label": CLASSES[target], "target": target,
                "subtype": n.subtype if n else "",
                "patient": (n.patient if group_by == "patient" else n.slide) if n else "",
                "slide": n.slide if n else "",
                "magnification": n.magnification if n else "", "split": split,
            })
    df = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    if df["split"].eq("").any() and df["split"].ne("").any():
        raise DatasetError(f"{root}: some images are in train/val/test folders and some are not.")
    return df


def _patient_of_slide(slide: str) -> str:
    return slide.rsplit("_", 1)[-1].rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


_SLIDE_NAME = re.compile(r"^SOB_[BM]_[A-Z]+_\d+-\d+[A-Z]*$")


def person_id(value: str) -> str:
    """The numeric patient id in a BreakHis slide folder name (``SOB_B_A_14-22549AB`` ->
    ``14-22549``), which ``--group-by slide`` stores as the patient; any other id unchanged."""
    return _patient_of_slide(value) if _SLIDE_NAME.match(value) else value


def is_breakhis(index: pd.DataFrame) -> bool:
    """Whether every row of the index came from a BreakHis file name."""
    return bool(len(index)) and bool(index["slide"].ne("").all())


def check_breakhis_complete(index: pd.DataFrame) -> list[str]:
    """Compares a BreakHis index with the published totals.

    Returns:
        One line per mismatch (empty when the copy is complete, or not BreakHis).
    """
    if not is_breakhis(index):
        return []
    t = BREAKHIS_TOTALS
    found = {
        "images": len(index),
        "benign": int(index["label"].eq("benign").sum()),
        "malignant": int(index["label"].eq("malignant").sum()),
        "slides": index["slide"].nunique(),
        "patients": index["slide"].map(_patient_of_slide).nunique(),
    }
    problems = [f"{k}: found {found[k]:,}, BreakHis v1 has {t[k]:,}"
                for k in ("images", "benign", "malignant", "slides", "patients")
                if found[k] != t[k]]
    by_mag = index["magnification"].value_counts()
    for mag, want in t["magnification"].items():
        got = int(by_mag.get(mag, 0))
        if got != want:
            problems.append(f"{mag} images: found {got:,}, BreakHis v1 has {want:,}")
    return problems


def summarize_index(index: pd.DataFrame) -> str:
    """A printable summary: images per class x magnification, and patients per class."""
    lines = []
    if index["magnification"].ne("").any():
        table = pd.crosstab(index["label"], index["magnification"], margins=True,
                            margins_name="total")
        mags = sorted((c for c in table.columns if c != "total"), key=lambda m: int(m[:-1]))
        table = table[mags + ["total"]]
    else:
        table = index.groupby("label").size().to_frame("images")
    lines.append("Images per class x magnification:")
    lines.append(table.to_string())
    if index["split"].ne("").any():
        lines.append("\nImages per split x class:")
        lines.append(pd.crosstab(index["split"], index["label"]).to_string())
    if index["patient"].ne("").any():
        per_class = index.groupby("label")["patient"].nunique()
        lines.append("\nPatients per class: " + ", ".join(
            f"{c} {per_class.get(c, 0)}" for c in CLASSES)
            + f" (total {index['patient'].nunique()}, slide folders {index['slide'].nunique()})")
    return "\n".join(lines)


@dataclass(frozen=True)
class BadImage:
    """An image file that could not be decoded, and why."""

    path: str
    reason: str


def verify_images(root: str | Path, index: pd.DataFrame, *, progress: bool = True
                  ) -> list[BadImage]:
    """Opens and fully decodes every indexed image.

    Returns:
        The unreadable, truncated or empty files with the reason for each.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    root = Path(root)
    bad = []
    for rel in tqdm(index["path"], desc="verify", unit="img", disable=not progress):
        p = root / rel
        try:
            if p.stat().st_size == 0:
                bad.append(BadImage(rel, "empty file"))
                continue
            with Image.open(p) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            bad.append(BadImage(rel, f"{type(e).__name__}: {e}"))
    return bad


def count_non_images(root: str | Path) -> int:
    """How many files under root were passed over because they are not images."""
    return _image_files(Path(root))[1]


def write_index(index: pd.DataFrame, path: str | Path) -> Path:
    """Writes the index as CSV and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.to_csv(path, index=False)
    return path


def read_index(path: str | Path) -> pd.DataFrame:
    """Reads an index or split CSV with every id column kept as text."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file. Make it with `bcd index ROOT --out {path}`.")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "label", "patient") if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; is it an index?")
    if "target" in df.columns:
        df["target"] = df["target"].astype(int)
    else:
        df["target"] = df["label"].map(CLASSES.index)
    return df
