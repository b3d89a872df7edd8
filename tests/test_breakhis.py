"""Indexing: BreakHis names, other layouts, verification, completeness."""

from __future__ import annotations

from pathlib import Path

import pytest

from breast_cancer_detection.cli import main
from breast_cancer_detection.data.breakhis import (
    BREAKHIS_TOTALS,
    DatasetError,
    build_index,
    check_breakhis_complete,
    parse_breakhis_name,
    read_index,
    verify_images,
    write_index,
)

from conftest import FAKE_SLIDES, SHARED_DATA, breakhis_relpath


def test_parse_breakhis_name():
    n = parse_breakhis_name("SOB_M_DC-14-2523-400-012.png")
    assert (n.label, n.subtype, n.patient, n.slide, n.magnification) == (
        "malignant", "ductal_carcinoma", "14-2523", "SOB_M_DC_14-2523", "400X")
    # Slide folders that differ by a letter suffix belong to one patient.
    a = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
    g = parse_breakhis_name("SOB_B_A-14-22549G-100-003.png")
    assert a.patient == g.patient == "14-22549"
    assert (a.slide, g.slide) == ("SOB_B_A_14-22549AB", "SOB_B_A_14-22549G")
    assert parse_breakhis_name("SOB_B_PT-14-21998CD-40-001.png").subtype == "phyllodes_tumor"
    assert parse_breakhis_name("patch0001.png") is None
    assert parse_breakhis_name("SOB_X_DC-14-2523-400-012.png") is None
    assert parse_breakhis_name("SOB_M_ZZ-14-2523-400-012.png") is None


def test_index_fake_breakhis(fake_breakhis):
    index = build_index(fake_breakhis)
    expected = sum(len(mags) * n for *_, mags, n in FAKE_SLIDES)
    assert len(index) == expected
    assert set(index["label"]) == {"benign", "malignant"}
    assert (index["target"] == (index["label"] == "malignant")).all()
    assert set(index["magnification"]) == {"40X", "100X", "200X", "400X"}
    assert index["subtype"].nunique() == 8
    # 22549AB and 22549CD are one patient, so 12 slide folders give 11 patients.
    assert index["slide"].nunique() == 12
    assert index["patient"].nunique() == 11
    assert index["split"].eq("").all()
    row = index[index["path"].str.endswith("SOB_M_DC-14-2523-400-002.png")].iloc[0]
    assert (root := fake_breakhis / row["path"]).is_file(), root
    assert row["slide"] == "SOB_M_DC_14-2523" and row["magnification"] == "400X"


def test_index_group_by_slide(fake_breakhis):
    index = build_index(fake_breakhis, group_by="slide")
    assert index["patient"].nunique() == 12
    assert set(index["patient"]) == set(index["slide"])


def test_index_prefers_file_names_over_folders(tmp_path, fake_breakhis):
    # Any layout that keeps the file names works: flatten the tree into one folder.
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(fake_breakhis.rglob("*.png"))[:10]:
        (flat / p.name).write_bytes(p.read_bytes())
    index = build_index(flat)
    assert len(index) == 10
    assert index["patient"].ne("").all()


def test_index_presplit_imagefolder(fake_imagefolder):
    index = build_index(fake_imagefolder)
    assert len(index) == 48
    assert set(index["split"]) == {"train", "val"}  # "valid" is normalised
    assert index.groupby(["split", "label"]).size().to_dict() == {
        ("train", "benign"): 16, ("train", "malignant"): 16,
        ("val", "benign"): 8, ("val", "malignant"): 8}
    assert index["patient"].eq("").all()


def test_index_plain_imagefolder(tmp_path, fake_imagefolder):
    for cls in ("negative", "positive"):
        d = tmp_path / cls
        d.mkdir()
        for p in list((fake_imagefolder / "train" / ("0" if cls == "negative" else "1")
                       ).iterdir())[:3]:
            (d / p.name).write_bytes(p.read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    index = build_index(tmp_path)
    assert sorted(index["label"]) == ["benign"] * 3 + ["malignant"] * 3
    assert index["split"].eq("").all()


def test_index_refuses_unknown_class_folder(tmp_path, fake_imagefolder):
    d = tmp_path / "cats"
    d.mkdir()
    src = next((fake_imagefolder / "train" / "0").iterdir())
    (d / "a.png").write_bytes(src.read_bytes())
    with pytest.raises(DatasetError, match="cats.*benign/malignant"):
        build_index(tmp_path)


def test_index_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="empty: no images"):
        build_index(tmp_path / "empty")
    with pytest.raises(DatasetError, match="bcd download"):
        build_index(tmp_path / "nowhere")


def test_verify_lists_bad_images(tmp_path, fake_breakhis):
    root = tmp_path / "tree"
    for p in sorted(fake_breakhis.rglob("*.png"))[:4]:
        dst = root / p.relative_to(fake_breakhis)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    files = sorted(root.rglob("*.png"))
    files[0].write_bytes(b"")  # empty
    files[1].write_bytes(files[1].read_bytes()[:60])  # truncated
    files[2].write_bytes(b"this is not a png at all")  # garbage
    index = build_index(root)
    bad = {Path(b.path).name: b.reason for b in verify_images(root, index, progress=False)}
    assert set(bad) == {files[0].name, files[1].name, files[2].name}
    assert bad[files[0].name] == "empty file"
    assert files[3].name not in bad


def test_completeness_report(fake_breakhis):
    problems = check_breakhis_complete(build_index(fake_breakhis))
    text = "\n".join(problems)
    assert "images: found 53, BreakHis v1 has 7,909" in text
    assert "40X images" in text
    assert check_breakhis_complete(build_index(fake_breakhis).iloc[0:0]) == []


def test_index_roundtrip(tmp_path, fake_breakhis):
    index = build_index(fake_breakhis)
    back = read_index(write_index(index, tmp_path / "i.csv"))
    assert back.equals(index)


def test_cli_index(tmp_path, fake_breakhis, capsys):
    out = tmp_path / "index.csv"
    assert main(["index", str(fake_breakhis), "--out", str(out), "--verify", "--quiet"]) == 0
    text = capsys.readouterr()
    assert "Images per class x magnification" in text.out
    assert "Patients per class: benign 4, malignant 7" in text.out
    assert "incomplete" in text.err
    assert len(read_index(out)) == 53
    assert main(["index", str(fake_breakhis), "--strict", "--quiet"]) == 1


@pytest.mark.real_data("breakhis-filelist.txt")
def test_full_filelist_totals(full_breakhis_index):
    index = full_breakhis_index
    assert len(index) == BREAKHIS_TOTALS["images"]
    assert index["label"].value_counts().to_dict() == {"malignant": 5429, "benign": 2480}
    assert index["magnification"].value_counts().to_dict() == BREAKHIS_TOTALS["magnification"]
    assert index["slide"].nunique() == 82
    assert index["patient"].nunique() == 70
    assert check_breakhis_complete(index) == []
    # The known oddities: one numeric id under three folders, one under two subtypes.
    assert set(index.loc[index["patient"] == "14-22549", "slide"]) == {
        "SOB_B_A_14-22549AB", "SOB_B_A_14-22549CD", "SOB_B_A_14-22549G"}
    assert index.loc[index["patient"] == "14-29960", "subtype"].nunique() == 2
    # No numeric id holds both classes.
    assert (index.groupby("patient")["target"].nunique() == 1).all()


@pytest.mark.real_data("breakhis-samples")
def test_index_real_samples():
    root = SHARED_DATA / "breakhis-samples"
    index = build_index(root)
    assert len(index) == 22
    assert index["label"].value_counts().to_dict() == {"benign": 13, "malignant": 9}
    assert index["magnification"].value_counts().to_dict() == {
        "40X": 9, "400X": 9, "200X": 3, "100X": 1}
    assert index["subtype"].nunique() == 8
    assert index["slide"].nunique() == 17
    assert verify_images(root, index, progress=False) == []


def test_fake_paths_are_real_layout():
    rel = breakhis_relpath("DC", "ductal_carcinoma", "malignant", "14-2523", "400", 12)
    assert rel.endswith("SOB_M_DC_14-2523/400X/SOB_M_DC-14-2523-400-012.png")
