"""Patient-disjoint splits and folds, written once as CSV and checked whenever loaded."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .breakhis import (
    DatasetError,
    parse_breakhis_name,
    person_id,
    read_index,
    write_index,
)

SUBSETS = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "patient", "label", "target", "magnification", "subtype", "slide",
                 "split"]


class LeakageError(DatasetError):
    """A patient appears in more than one subset of a split."""


class ThinSubsetWarning(UserWarning):
    """A val or test subset holds fewer than two patients of a class."""


def breakhis_patients(paths) -> pd.Series:
    """The numeric BreakHis patient id each file name carries (``14-22549`` for every folder
    of that patient: ``22549AB``, ``22549CD``, ``22549G``); ``""`` for other names."""
    paths = pd.Series(paths, dtype=str)
    names = [parse_breakhis_name(Path(p).name) for p in paths]
    return pd.Series([n.patient if n is not None else "" for n in names], index=paths.index,
                     dtype=str)


def people(rows: pd.DataFrame) -> set[str]:
    """The people ``rows`` (``path``, ``patient``) come from, named alike whatever the id
    form: the numeric BreakHis id of each file name, else the patient column with slide
    folders (``--group-by slide``) mapped to their numeric id. Blank ids are left out."""
    numeric = breakhis_patients(rows["path"])
    named = rows["patient"].astype(str).map(person_id)
    return set(numeric.where(numeric != "", named)) - {""}


def _groups(index: pd.DataFrame) -> pd.Series:
    """The grouping key of each row: the person the image comes from.

    For a BreakHis file that is the numeric patient id of its name, whatever the ``patient``
    column holds (with ``--group-by slide`` it holds the slide folder, and one patient's
    folders must still land in one subset); else the ``patient`` column, or the image itself
    when no patient is known.
    """
    numeric = breakhis_patients(index["path"])
    if numeric.ne("").all():
        return numeric
    if index["patient"].eq("").all():
        warnings.warn(
            "The data carries no patient ids, so this split groups by image. If several images "
            "come from one patient, accuracy on it will be optimistic.",
            stacklevel=3,
        )
        return index["path"]
    if index["patient"].eq("").any():
        raise DatasetError("Some rows have a patient id and some do not; cannot split by patient.")
    return index["patient"]


def _patient_table(index: pd.DataFrame, keys: pd.Series) -> pd.DataFrame:
    """One row per patient (``keys``, from :func:`_groups`): its class (0/1) and image
    count, in a stable order."""
    per = index.assign(_g=keys).groupby("_g").agg(target=("target", "max"),
                                                   n_classes=("target", "nunique"),
                                                   images=("path", "size"))
    mixed = per.index[per["n_classes"] > 1].tolist()
    if mixed:
        # Such a patient still goes to one subset as a whole; its class for stratification
        # is malignant, since any malignant tissue makes the case malignant.
        warnings.warn(f"Patients with images of both classes: {mixed[:5]}", stacklevel=3)
    return per.sort_index()


def _filter_magnification(index: pd.DataFrame, magnification: list[str] | None) -> pd.DataFrame:
    if not magnification:
        return index
    mags = {m.upper() if m.upper().endswith("X") else f"{m}X" for m in magnification}
    out = index[index["magnification"].isin(mags)]
    if out.empty:
        raise DatasetError(f"No images at magnification {', '.join(sorted(mags))}; the index has "
                           f"{', '.join(sorted(index['magnification'].unique()))}.")
    return out


def _deal_once(patients: pd.DataFrame, bins: list[str], fractions: list[float],
               rng: np.random.Generator) -> tuple[dict[str, str], float]:
    """Deals each class's patients, in random order, to the bin furthest below its target.

    Returns:
        The assignment and its cost: how far, summed over bins and classes, each bin's image
        count is from its target, as a share of the class's images.
    """
    out: dict[str, str] = {}
    cost = 0.0
    for _, cls in patients.groupby("target"):
        order = rng.permutation(cls.index.to_numpy())
        total = cls["images"].sum()
        filled = dict.fromkeys(bins, 0)
        for pid in order:
            deficit = [f * total - filled[b] for b, f in zip(bins, fractions)]
            b = bins[int(np.argmax(deficit))]
            out[pid] = b
            filled[b] += cls.at[pid, "images"]
        cost += sum(abs(filled[b] - f * total) for b, f in zip(bins, fractions)) / total
    return out, cost


def _assign(patients: pd.DataFrame, bins: list[str], fractions: list[float], seed: int,
            trials: int = 200) -> dict[str, str]:
    """The best of ``trials`` seeded deals: whole patients per bin, class shares kept.

    Targets count images, not patients, because BreakHis patients hold 10 to 300+ images, so
    one deal can overshoot; trying many and keeping the closest is cheap and deterministic.
    """
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(trials):
        where, cost = _deal_once(patients, bins, fractions, rng)
        if cost < best_cost:
            best, best_cost = where, cost
    return best


def _warn_thin_subsets(patients: pd.DataFrame, by_patient: bool) -> None:
    """Warns when a subset holds patients of one class only, or a single one of a class:
    its patient-level figures for that class can then only be 0 or 1."""
    if not by_patient:
        return
    thin = []
    for subset, part in patients.groupby("split"):
        if subset == "train" or part.empty:
            continue
        for target, name in ((0, "benign"), (1, "malignant")):
            n = int((part["target"] == target).sum())
            if n < 2:
                thin.append(f"{subset} holds {n} {name} patient{'' if n == 1 else 's'}")
    if thin:
        warnings.warn("; ".join(thin) + ": patient-level sensitivity or specificity there can "
                      "only be 0 or 1, and its bootstrap intervals are uninformative. Another "
                      "--seed or larger --val/--test shares may spread the patients better.",
                      ThinSubsetWarning, stacklevel=3)


def make_split(index: pd.DataFrame, *, val: float = 0.15, test: float = 0.15, seed: int = 0,
               magnification: list[str] | None = None) -> pd.DataFrame:
    """Splits an index into train/val/test with no patient in two subsets.

    Stratified by class and deterministic for a seed. An index that is already split on disk
    (``root/{train,val,test}/...``) keeps its split.

    Args:
        index: Table from :func:`build_index`.
        val: Share of each class's images for validation.
        test: Share of each class's images for test.
        seed: Random seed; the same seed and index give the same split.
        magnification: Keep only these magnifications (e.g. ``["40X"]``).

    Returns:
        The split table (``SPLIT_COLUMNS``).
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DatasetError(f"--val {val} and --test {test}: each a share in [0, 1), and the two "
                           "summing to under 1 (e.g. --val 0.15 --test 0.15).")
    index = _filter_magnification(index, magnification).copy()
    given = set(index["split"])
    if given - {""} and len(given) == 1:  # every image under one train/val/test folder
        warnings.warn(f"Every image is under the '{given.pop()}' folder: that is not a split; "
                      "splitting by patient instead.", stacklevel=2)
        index["split"] = ""
    if index["split"].ne("").all():
        out = index[SPLIT_COLUMNS].reset_index(drop=True)
        try:
            check_split(out)
        except LeakageError as e:
            raise LeakageError(f"the data's train/val/test folders split a patient: {e} Move "
                               "each such patient's images into one folder, or take the "
                               "images out of the folders to split them by patient.") from None
    else:
        keys = _groups(index)
        patients = _patient_table(index, keys)
        where = _assign(patients, ["train", "val", "test"], [1 - val - test, val, test], seed)
        out = index.assign(split=keys.map(where))
        _warn_thin_subsets(patients.assign(split=pd.Series(where)), index["patient"].ne("").all())
    out = out[SPLIT_COLUMNS].reset_index(drop=True)
    check_split(out)
    return out


def make_folds(index: pd.DataFrame, *, folds: int = 5, seed: int = 0,
               magnification: list[str] | None = None) -> pd.DataFrame:
    """Assigns each patient to one of ``folds`` folds, stratified by class.

    Returns:
        The split table with a ``fold`` column (0..folds-1); ``split`` is empty. Use
        :func:`fold_split` to turn fold k into train/val/test.
    """
    if folds < 2:
        raise DatasetError(f"--folds {folds}: at least 2 (e.g. --folds 5).")
    index = _filter_magnification(index, magnification).copy()
    keys = _groups(index)
    patients = _patient_table(index, keys)
    if len(patients) < folds:
        raise DatasetError(f"{len(patients)} patients cannot fill {folds} folds.")
    names = [str(k) for k in range(folds)]
    where = _assign(patients, names, [1 / folds] * folds, seed)
    out = index.assign(split="", fold=keys.map(where).astype(int))
    return out[SPLIT_COLUMNS + ["fold"]].reset_index(drop=True)


def fold_split(folds_table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Fold ``k`` is test, fold ``k+1`` is validation, the rest is train."""
    n = int(folds_table["fold"].astype(int).max()) + 1
    fold = folds_table["fold"].astype(int)
    split = np.where(fold == k, "test", np.where(fold == (k + 1) % n, "val", "train"))
    out = folds_table.assign(split=split)
    check_split(out)
    return out


def read_protocol_folds(path: str | Path, index: pd.DataFrame, fold: int,
                        magnification: list[str] | None = None) -> pd.DataFrame:
    """Reads the official BreakHis 5-fold protocol (Spanhol et al. 2016) for one fold.

    Accepts the ``Folds.csv`` layout (columns ``fold, mag, filename, grp``) or the original
    ``dsfoldN.txt`` lines (``SOB_...png|mag|fold|train``). Files are matched by name, so any
    copy of BreakHis works. In the protocol each fold has only train and test; validation is
    carved from train by patient.

    Returns:
        The split table for that fold.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such fold file.")
    if path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str)
        table = table[table["fold"].astype(int) == fold]
        names = table["filename"].map(lambda s: Path(s).name)
        grp = table["grp"].str.lower()
    else:
        rows = [line.strip().split("|") for line in path.read_text().splitlines() if line.strip()]
        if any(len(r) != 4 or not r[2].strip().isdigit() for r in rows):
            raise DatasetError(f"{path}: expected lines FILE|MAGNIFICATION|FOLD|train-or-test "
                               "(the dsfoldN.txt layout of Spanhol et al.).")
        rows = [r for r in rows if int(r[2]) == fold]  # a file may hold several folds
        if not rows:
            raise DatasetError(f"{path}: no lines of fold {fold}; pass the --fold it holds.")
        names = pd.Series([r[0] for r in rows])
        grp = pd.Series([r[-1].lower() for r in rows])
    where = dict(zip(names, grp))
    index = _filter_magnification(index, magnification)
    base = index["path"].map(lambda s: Path(s).name)
    kept = index[base.isin(where)].copy()
    if kept.empty:
        raise DatasetError(f"{path}: none of its file names match the indexed images.")
    kept["split"] = base[kept.index].map(where).replace({"tst": "test", "trn": "train"})
    train = kept[kept["split"] == "train"]
    with warnings.catch_warnings():  # the protocol's own subsets are what they are
        warnings.simplefilter("ignore", ThinSubsetWarning)
        inner = make_split(train.assign(split=""), val=0.15, test=0.0, seed=fold)
    kept.loc[kept["path"].isin(inner.loc[inner["split"] == "val", "path"]), "split"] = "val"
    out = kept[SPLIT_COLUMNS].reset_index(drop=True)
    check_split(out)
    return out


def _in_two_subsets(split: pd.DataFrame, ids: pd.Series) -> list[str]:
    """The non-empty ``ids`` (one per row of ``split``) found in more than one subset."""
    per = split.assign(_id=ids)[ids != ""].groupby("_id")["split"].nunique()
    return per[per > 1].index.tolist()


def check_split(split: pd.DataFrame) -> None:
    """Raises LeakageError naming the patients found in more than one subset."""
    bad_values = set(split["split"]) - set(SUBSETS)
    if bad_values:
        raise DatasetError(f"Unknown subset name(s) {sorted(bad_values)}; use {SUBSETS}.")
    leaked = _in_two_subsets(split, split["patient"])
    if leaked:
        raise LeakageError(
            f"{len(leaked)} patient(s) appear in more than one subset: "
            f"{', '.join(leaked[:10])}. Make the split with `bcd split` so each patient lands in "
            "one subset."
        )
    # BreakHis file names carry the patient whatever the patient column says (a slide folder,
    # a blank, another id): one person's images in two subsets is leakage all the same.
    leaked = _in_two_subsets(split, breakhis_patients(split["path"]))
    if leaked:
        raise LeakageError(
            f"{len(leaked)} BreakHis patient(s) have images in more than one subset, by the "
            f"patient id their file names carry: {', '.join(leaked[:10])}. BreakHis files some "
            "patients under several slide folders (14-22549 as 22549AB, 22549CD and 22549G), "
            "and this split keeps folders or images together, not patients. Make the split "
            "with `bcd split` (it groups BreakHis images by that id)."
        )


def write_split(split: pd.DataFrame, path: str | Path) -> Path:
    """Writes a split CSV (after checking it) and returns the path."""
    if split["split"].ne("").all():
        check_split(split)
    return write_index(split, path)


def load_split(path: str | Path) -> pd.DataFrame:
    """Reads a split CSV and checks that no patient is in two subsets."""
    split = read_index(path)
    if "split" not in split.columns:
        raise DatasetError(f"{path}: no 'split' column; make one with `bcd split`.")
    if "fold" in split.columns and split["split"].eq("").all():
        return split
    check_split(split)
    return split


def split_hash(split: pd.DataFrame) -> str:
    """A short hash of (path, split) pairs, to tie a checkpoint to the split it was trained on."""
    h = hashlib.sha256()
    for p, s in sorted(zip(split["path"], split["split"])):
        h.update(f"{p}\t{s}\n".encode())
    return h.hexdigest()[:16]


def summarize_split(split: pd.DataFrame) -> str:
    """Images, patients and malignant share per subset, as a printable table."""
    rows = []
    for name in SUBSETS:
        part = split[split["split"] == name]
        if part.empty:
            continue
        rows.append({
            "subset": name, "images": len(part),
            "patients": part["patient"].nunique() if part["patient"].ne("").any() else 0,
            "benign": int((part["target"] == 0).sum()),
            "malignant": int((part["target"] == 1).sum()),
            "malignant %": round(100 * part["target"].mean(), 1),
        })
    return pd.DataFrame(rows).to_string(index=False)


# ----------------------------------------------------------------------------- leakage


def list_ids(items, k: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:k]) + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def find_leakage(split_patients: dict[str, list[str]], evaluated: pd.DataFrame, subset: str,
                 run_paths: tuple[set[str], set[str]] | None = None) -> list[str]:
    """Sentences naming the evaluated patients (or images) the checkpoint trained or chose on.

    Training patients are always leakage. Validation patients are too, except when the
    evaluated subset is ``val`` itself: that case is reported as a caveat instead, since the
    user asked for it.

    Args:
        split_patients: Subset -> patient ids of the model's training split (a checkpoint's
            ``split_patients``).
        evaluated: The evaluated rows (``patient``, ``path``).
        subset: The evaluated subset's name.
        run_paths: Training and validation paths of the checkpoint's run, for data without
            patient ids.
    """
    # One person, whatever form the two sides name them in: numeric BreakHis ids, or slide
    # folders (`--group-by slide`), or the ids of other data.
    known = {part: {person_id(str(x)) for x in ids} for part, ids in (split_patients or {}).items()}
    patients = people(evaluated)
    out = []
    for part, what in (("train", "training subset"), ("val", "validation subset, which picked "
                                                       "its best epoch")):
        if part == "val" and subset == "val":
            continue
        shared = patients & set(known.get(part, []))
        if shared:
            out.append(f"{len(shared)} of the {len(patients)} evaluated patients were in the "
                       f"checkpoint's {what} ({list_ids(shared)}).")
    if run_paths is not None:
        for part, paths in zip(("training", "validation"), run_paths):
            if part == "validation" and subset == "val":
                continue
            shared = set(evaluated["path"]) & paths
            if shared:
                out.append(f"{len(shared)} of the {len(evaluated)} evaluated images were in the "
                           f"checkpoint's {part} subset ({list_ids(shared, 3)}).")
    return out
