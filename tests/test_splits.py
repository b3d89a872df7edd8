"""Patient-disjoint splits, folds, the official protocol file and the leakage check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from breast_cancer_detection.cli import main
from breast_cancer_detection.data.breakhis import DatasetError, build_index
from breast_cancer_detection.data.splits import (
    LeakageError,
    check_split,
    find_leakage,
    fold_split,
    load_split,
    make_folds,
    make_split,
    read_protocol_folds,
    split_hash,
    write_split,
)


def _patients_per_subset(split: pd.DataFrame) -> dict[str, set[str]]:
    return {s: set(g["patient"]) for s, g in split.groupby("split")}


def test_split_is_patient_disjoint_and_deterministic(fake_breakhis):
    index = build_index(fake_breakhis)
    a = make_split(index, val=0.2, test=0.2, seed=3)
    b = make_split(index, val=0.2, test=0.2, seed=3)
    c = make_split(index, val=0.2, test=0.2, seed=4)
    assert a.equals(b)
    assert not a["split"].equals(c["split"])
    sets = _patients_per_subset(a)
    assert set(sets) == {"train", "val", "test"}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"]
                or sets["val"] & sets["test"])
    # Every image kept, and the two slide folders of patient 14-22549 stay together.
    assert len(a) == len(index)
    assert a.loc[a["patient"] == "14-22549", "split"].nunique() == 1
    # Stratified: every subset holds both classes.
    assert (a.groupby("split")["target"].nunique() == 2).all()


def test_split_magnification_filter(fake_breakhis):
    index = build_index(fake_breakhis)
    split = make_split(index, magnification=["400x"], val=0.2, test=0.2)
    assert set(split["magnification"]) == {"400X"}
    assert len(split) == (index["magnification"] == "400X").sum()


def test_presplit_folder_keeps_its_split(fake_imagefolder):
    split = make_split(build_index(fake_imagefolder))
    assert split.groupby("split").size().to_dict() == {"train": 32, "val": 16}


def test_leakage_is_an_error(tmp_path, fake_breakhis):
    split = make_split(build_index(fake_breakhis), val=0.2, test=0.2)
    victim = split[split["split"] == "test"]["patient"].iloc[0]
    row = split.index[(split["patient"] == victim)][0]
    split.loc[row, "split"] = "train"
    with pytest.raises(LeakageError, match=victim):
        check_split(split)
    path = tmp_path / "leaky.csv"
    split.to_csv(path, index=False)
    with pytest.raises(LeakageError):
        load_split(path)


def test_find_leakage_reports_a_validation_patient_outside_the_val_subset():
    # A test patient the checkpoint chose its best epoch on is leakage, by patient and by path;
    # the same rows evaluated as the val subset itself are not (a caveat elsewhere).
    known = {"train": ["14-1", "14-2"], "val": ["14-3"], "test": ["14-4"]}
    evaluated = pd.DataFrame({"patient": ["14-3", "14-4"], "path": ["a.png", "b.png"]})
    run_paths = ({"t.png"}, {"a.png"})
    found = find_leakage(known, evaluated, "test", run_paths)
    assert len(found) == 2 and all("validation subset" in s for s in found)
    assert "1 of the 2 evaluated patients" in found[0] and "14-3" in found[0]
    assert "1 of the 2 evaluated images" in found[1] and "a.png" in found[1]
    assert find_leakage(known, evaluated, "val", run_paths) == []
    # Training overlap counts whatever the subset.
    assert "training subset" in find_leakage(known, evaluated.assign(patient=["14-1", ""]),
                                             "val")[0]


def test_split_roundtrip_and_hash(tmp_path, fake_breakhis):
    split = make_split(build_index(fake_breakhis), val=0.2, test=0.2)
    back = load_split(write_split(split, tmp_path / "s.csv"))
    assert list(back["path"]) == list(split["path"])
    assert split_hash(back) == split_hash(split)
    moved = split.copy()
    moved.loc[0, "split"] = "test" if moved.loc[0, "split"] != "test" else "train"
    assert split_hash(moved) != split_hash(split)


def test_folds_cover_every_patient_once(fake_breakhis):
    index = build_index(fake_breakhis)
    folds = make_folds(index, folds=3, seed=0)
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    for k in range(3):
        s = fold_split(folds, k)
        assert set(s.loc[s["split"] == "test", "fold"]) == {k}
        assert set(s.loc[s["split"] == "val", "fold"]) == {(k + 1) % 3}
    with pytest.raises(Exception, match="cannot fill"):
        make_folds(index, folds=50)


def test_protocol_fold_file(tmp_path, fake_breakhis):
    index = build_index(fake_breakhis)
    split = make_split(index, val=0.0, test=0.3, seed=1)
    names = split["path"].map(lambda p: Path(p).name)
    lines = [f"{n}|{m[:-1]}|1|{'test' if s == 'test' else 'train'}"
             for n, m, s in zip(names, split["magnification"], split["split"])]
    txt = tmp_path / "dsfold1.txt"
    txt.write_text("\n".join(lines) + "\n")
    out = read_protocol_folds(txt, index, fold=1)
    assert set(out["split"]) == {"train", "val", "test"}
    assert set(out.loc[out["split"] == "test", "path"]) == set(
        split.loc[split["split"] == "test", "path"])
    csv = tmp_path / "Folds.csv"
    pd.DataFrame({"fold": 1, "mag": split["magnification"].str[:-1],
                  "filename": "BreaKHis_v1/" + split["path"],
                  "grp": ["test" if s == "test" else "train" for s in split["split"]]}
                 ).to_csv(csv, index=False)
    assert set(read_protocol_folds(csv, index, fold=1)["path"]) == set(index["path"])
    # A file holding several folds gives each its own lines, and names a fold it lacks.
    both = tmp_path / "dsfold12.txt"
    flipped = [ln.replace("|1|test", "|2|train").replace("|1|train", "|2|test") for ln in lines]
    both.write_text("\n".join(lines + flipped) + "\n")
    fold2 = read_protocol_folds(both, index, fold=2)
    assert set(fold2.loc[fold2["split"] == "test", "path"]) == set(
        split.loc[split["split"] != "test", "path"])
    with pytest.raises(DatasetError, match="no lines of fold 3"):
        read_protocol_folds(both, index, fold=3)


def test_protocol_fold_file_that_leaks_is_refused(tmp_path, fake_breakhis):
    index = build_index(fake_breakhis)
    names = index["path"].map(lambda p: Path(p).name)
    # Image-level alternation puts every patient in both train and test.
    lines = [f"{n}|40|1|{'test' if i % 2 else 'train'}" for i, n in enumerate(names)]
    (tmp_path / "f.txt").write_text("\n".join(lines))
    with pytest.raises(LeakageError):
        read_protocol_folds(tmp_path / "f.txt", index, fold=1)


def test_cli_split(tmp_path, fake_breakhis, capsys):
    out = tmp_path / "split.csv"
    assert main(["split", str(fake_breakhis), "--out", str(out), "--val", "0.2",
                 "--test", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "No patient is in more than one subset" in printed
    assert "malignant %" in printed
    assert set(load_split(out)["split"]) == {"train", "val", "test"}
    folds = tmp_path / "folds.csv"
    assert main(["split", str(fake_breakhis), "--out", str(folds), "--folds", "3"]) == 0
    assert sorted(load_split(folds)["fold"].astype(int).unique()) == [0, 1, 2]


@pytest.mark.real_data("breakhis-filelist.txt")
@pytest.mark.slow
def test_full_breakhis_split(full_breakhis_index):
    index = full_breakhis_index
    for seed in range(3):
        split = make_split(index, val=0.15, test=0.15, seed=seed)
        sets = _patients_per_subset(split)
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"]
                    or sets["val"] & sets["test"])
        assert sum(len(v) for v in sets.values()) == 70
        share = split.groupby("split")["target"].mean()
        for subset, s in share.items():
            assert abs(s - 5429 / 7909) <= 0.05, (seed, subset, s)
        sizes = split["split"].value_counts(normalize=True)
        assert abs(sizes["test"] - 0.15) < 0.05 and abs(sizes["val"] - 0.15) < 0.05
    folds = make_folds(index, folds=5)
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    for k in range(5):
        assert abs(folds.loc[folds["fold"] == k, "target"].mean() - 0.686) <= 0.05


def _numeric_subsets(split: pd.DataFrame) -> pd.Series:
    from breast_cancer_detection.data.splits import breakhis_patients

    return split.assign(n=breakhis_patients(split["path"])).groupby("n")["split"].nunique()


@pytest.mark.slow
def test_grouping_by_slide_still_keeps_each_patient_in_one_subset(fake_breakhis):
    # 14-22549 has two slide folders (22549AB, 22549CD): grouped by folder they could be split.
    index = build_index(fake_breakhis, group_by="slide")
    assert index["patient"].nunique() == 12  # folders, as asked: patient-level metrics use them
    for seed in range(20):
        split = make_split(index, val=0.25, test=0.25, seed=seed)
        assert (_numeric_subsets(split) == 1).all(), seed
        assert (_numeric_subsets(make_folds(index, folds=3, seed=seed)
                                 .rename(columns={"split": "_", "fold": "split"})) == 1).all()


@pytest.mark.parametrize("patient", ["", "SOB_B_A_14-22549CD", "someone-else"])
def test_a_split_that_parts_one_breakhis_patient_is_refused_whatever_its_ids(fake_breakhis,
                                                                              patient):
    split = make_split(build_index(fake_breakhis), val=0.25, test=0.25, seed=0)
    rows = split.index[split["patient"] == "14-22549"]
    other = next(s for s in ("train", "val", "test") if s != split.at[rows[0], "split"])
    # The moved image carries an id that a user's CSV or another grouping might give it.
    split.at[rows[0], "patient"] = patient
    split.at[rows[0], "split"] = other
    with pytest.raises(LeakageError, match="BreakHis patient.*14-22549"):
        check_split(split)


def test_leakage_is_found_across_slide_and_numeric_ids(fake_breakhis):
    index = build_index(fake_breakhis)
    folder_b = index[index["slide"].str.endswith("22549CD")]
    # The checkpoint was trained with --group-by slide on folder AB; folder CD is evaluated
    # with numeric ids: the same person.
    trained = {"train": ["SOB_B_A_14-22549AB"], "val": [], "test": []}
    found = find_leakage(trained, folder_b, "test")
    assert len(found) == 1 and "14-22549" in found[0]
    assert find_leakage(trained, folder_b.assign(patient="SOB_B_A_14-22549CD"), "test")
    assert not find_leakage({"train": ["SOB_B_F_14-25197"]}, folder_b, "test")


def test_breakhis_images_in_split_folders_keep_that_split_unless_it_parts_a_patient(
        fake_breakhis, tmp_path):
    import shutil

    index = build_index(fake_breakhis)
    chosen = make_split(index, val=0.25, test=0.25, seed=0)
    root = tmp_path / "presplit"
    for rel, subset in zip(chosen["path"], chosen["split"]):
        dest = root / {"val": "valid"}.get(subset, subset) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fake_breakhis / rel, dest)
    kept = make_split(build_index(root), val=0.25, test=0.25, seed=5)  # another seed: unused
    assert sorted(zip(kept["path"].str.split("/", n=1).str[1], kept["split"])) == sorted(
        zip(chosen["path"], chosen["split"]))
    # The same layout with one patient's image moved to another subset's folder is refused.
    victim = next(root.rglob("*22549AB-40-001.png"))
    subset = victim.relative_to(root).parts[0]
    other = "test" if subset != "test" else "train"
    moved = root / other / victim.relative_to(root / subset)
    moved.parent.mkdir(parents=True, exist_ok=True)
    victim.rename(moved)
    with pytest.raises(LeakageError, match="folders split a patient.*14-22549.*into one folder"):
        make_split(build_index(root), val=0.25, test=0.25, seed=0)


def test_breakhis_images_all_under_one_train_folder_are_split_by_patient(fake_breakhis,
                                                                         tmp_path):
    import shutil

    shutil.copytree(fake_breakhis, tmp_path / "train")
    with pytest.warns(UserWarning, match="under the 'train' folder: that is not a split"):
        split = make_split(build_index(tmp_path), val=0.25, test=0.25, seed=0)
    assert set(split["split"]) == {"train", "val", "test"}


def test_a_subset_with_one_patient_of_a_class_is_warned_about(fake_breakhis):
    index = build_index(fake_breakhis)  # 4 benign patients: a quarter each cannot be 2
    from breast_cancer_detection.data.splits import ThinSubsetWarning

    with pytest.warns(ThinSubsetWarning, match="holds 1 benign patient: patient-level"):
        make_split(index, val=0.25, test=0.25, seed=0)
