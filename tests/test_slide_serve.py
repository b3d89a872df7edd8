"""`bcd serve --slides DIR`: the app lists what `bcd slide --out DIR` wrote and serves only
the files of the slides it lists."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from urllib.parse import quote, urljoin

import pytest
from PIL import Image

from conftest import serve_app

pytest.importorskip("fastapi", reason="the web app needs fastapi: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="the web app needs python-multipart")
pytest.importorskip("httpx", reason="the API tests need httpx")

from breast_cancer_detection.app import create_app  # noqa: E402
from breast_cancer_detection.cli import main  # noqa: E402
from breast_cancer_detection.errors import UserError  # noqa: E402

with warnings.catch_warnings():
    # Starlette suggests httpx2 for its TestClient; httpx is what FastAPI documents.
    warnings.filterwarnings("ignore", message=".*install `httpx2`")
    from fastapi.testclient import TestClient  # noqa: E402

COLUMNS = ["slide", "score", "tiles", "tumour_tiles", "tissue_mm2", "seconds", "tiles_per_s",
           "mpp", "mpp_source", "level", "error", "folder"]
TYPES = {"heatmap.png": "image/png", "tissue.png": "image/png", "top_tiles.png": "image/png",
         "regions.geojson": "application/geo+json", "tiles.csv": "text/csv"}
# Areas of the seven regions of slide a, in the order written: the listing sorts them.
AREAS = [0.02, 0.5, 0.1, 0.03, 0.7, 0.01, 0.2]


def _client(app) -> TestClient:
    # A Host the server answers to (it refuses names it was not given: DNS rebinding).
    return TestClient(app, base_url="http://127.0.0.1")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _row(slide: str, folder: str, **values) -> dict[str, object]:
    return {**dict.fromkeys(COLUMNS, ""), "slide": slide, "folder": folder, **values}


def _write_table(root: Path, rows: list[dict[str, object]]) -> None:
    with open(root / "slides.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _write_slide(folder: Path, regions: int) -> None:
    """A slide folder as `bcd slide` writes it (tiny pictures, hand-made regions)."""
    folder.mkdir(parents=True)
    for i, name in enumerate(("heatmap.png", "tissue.png", "top_tiles.png")):
        (folder / name).write_bytes(_png(4 + i, 3))
    features = [{"type": "Feature",
                 "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1],
                                                                  [0, 0]]]},
                 "properties": {"objectType": "annotation", "name": f"region {k + 1}",
                                "tiles": k + 1, "area_mm2": area, "mean_p": 0.7,
                                "max_p": round(0.9 + k / 100, 2)}}
                for k, area in enumerate(AREAS[:regions])]
    (folder / "regions.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                        "features": features}))
    (folder / "tiles.csv").write_text("x,y,width,height,p_malignant\n0,0,64,64,0.9\n")
    (folder / "slide.json").write_text(json.dumps({"settings": {"slide": str(folder)}}))


@pytest.fixture
def slides_dir(tmp_path) -> Path:
    """An --out folder of `bcd slide` with two slides done and one failed, from paths that
    name their users."""
    root = tmp_path / "out"
    _write_slide(root / "a", regions=len(AREAS))
    _write_slide(root / "b", regions=0)
    _write_table(root, [
        _row("/home/alice/slides/a.svs", "a", score=0.91, tiles=120, tumour_tiles=14,
             tissue_mm2=3.5),
        _row("C:\\Users\\bob\\b.ndpi", "b", score=0.12, tiles=80, tumour_tiles=0,
             tissue_mm2=2.25),
        _row("/home/alice/slides/bad.svs", "bad", score="nan", tiles=0, tumour_tiles=0,
             error="/home/alice/slides/bad.svs: not a slide OpenSlide can read (tried "
                   "/home/alice/.cache/x)."),
    ])
    return root


def _by_name(listing: dict) -> dict[str, dict]:
    return {s["name"]: s for s in listing["slides"]}


# ----------------------------------------------------------------------------- listing


def test_listing_names_each_slide_without_its_local_path(predictor, slides_dir):
    r = _client(create_app(predictor, slides=slides_dir)).get("/api/slides")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["message"] is None
    assert [s["name"] for s in body["slides"]] == ["a.svs", "b.ndpi", "bad.svs"]
    for private in ("alice", "bob", "/home", "Users", str(slides_dir)):
        assert private not in r.text, private

    slides = _by_name(body)
    a = slides["a.svs"]
    assert (a["folder"], a["score"], a["tiles"], a["tumour_tiles"], a["tissue_mm2"],
            a["error"]) == ("a", 0.91, 120, 14, 3.5, "")
    assert a["regions"] == len(AREAS)
    assert [g["area_mm2"] for g in a["largest_regions"]] == [0.7, 0.5, 0.2, 0.1, 0.03]
    assert a["largest_regions"][0] == {"tiles": 5, "area_mm2": 0.7, "max_p": 0.94}
    assert set(a["files"]) == set(TYPES)
    b = slides["b.ndpi"]
    assert (b["regions"], b["largest_regions"], b["score"]) == (0, [], 0.12)

    bad = slides["bad.svs"]
    assert bad["error"] == "bad.svs: not a slide OpenSlide can read (tried x)."
    assert (bad["score"], bad["tissue_mm2"], bad["regions"], bad["files"]) == (
        None, None, None, {})


def test_listing_is_read_afresh_on_each_request(predictor, slides_dir):
    client = _client(create_app(predictor, slides=slides_dir))
    assert len(client.get("/api/slides").json()["slides"]) == 3
    # `bcd slide` rewrites slides.csv after every slide: the next one shows up at once.
    _write_slide(slides_dir / "c", regions=2)
    with open(slides_dir / "slides.csv", "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, COLUMNS).writerow(_row("/data/c.tif", "c", score=0.5, tiles=9))
    c = _by_name(client.get("/api/slides").json())["c.tif"]
    assert (c["score"], c["tiles"], c["regions"]) == (0.5, 9, 2)
    assert client.get("/api/slides/c/heatmap.png").status_code == 200


class _CountingRow(dict):
    """A row of slides.csv that counts the lookups made in it."""

    lookups = 0

    def get(self, *args):
        type(self).lookups += 1
        return super().get(*args)


@pytest.mark.slow
def test_a_long_listing_costs_in_proportion_and_is_kept_until_the_table_changes(
        predictor, tmp_path, monkeypatch):
    from breast_cancer_detection.app import slides as slides_module

    root = tmp_path / "out"
    for i in range(3):
        _write_slide(root / f"s{i}", regions=1)
    n = 2000  # most of their folders are missing: a run under way, or cleaned up
    _write_table(root, [_row(f"/data/s{i}.svs", f"s{i}", score=0.5) for i in range(n)])
    reads = []
    real_table = slides_module.Slides.table

    def counted(self):
        rows, message = real_table(self)
        reads.append(len(rows))
        return [_CountingRow(row) for row in rows], message

    monkeypatch.setattr(slides_module.Slides, "table", counted)
    client = _client(create_app(predictor, slides=root))
    listing = client.get("/api/slides").json()["slides"]
    assert len(listing) == n and reads == [n]
    assert set(listing[0]["files"]) == set(TYPES) and listing[-1]["files"] == {}
    # Linear: a few lookups per row, never a pass over the table for each of its files.
    assert _CountingRow.lookups < 20 * n

    # A table written just now is read again on every request (its next version may carry
    # the same time stamp); once settled, the listing is kept until the table changes.
    client.get("/api/slides")
    assert reads == [n, n]
    monkeypatch.setattr(slides_module.Slides, "SETTLED_NS", 0)
    first = client.get("/api/slides").json()
    assert client.get("/api/slides").json() == first and reads == [n, n, n]
    assert client.get("/api/slides/s1/heatmap.png").status_code == 200 and len(reads) == 3
    with open(root / "slides.csv", "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, COLUMNS).writerow(_row("/data/new.svs", "new"))
    assert len(client.get("/api/slides").json()["slides"]) == n + 1 and reads[-1] == n + 1
    shutil.rmtree(root / "s2")  # DIR changed: files are looked for again
    assert _by_name(client.get("/api/slides").json())["s2.svs"]["files"] == {}


@pytest.mark.parametrize("table", [None, b"\xff\xfe\x00garbage\x00", b"name,value\nx,1\n"],
                         ids=["missing", "not-utf8", "other-csv"])
def test_no_readable_table_is_an_empty_list_saying_what_to_run(predictor, tmp_path, table):
    root = tmp_path / "out"
    root.mkdir()
    if table is not None:
        (root / "slides.csv").write_bytes(table)
    r = _client(create_app(predictor, slides=root)).get("/api/slides")
    assert r.status_code == 200
    body = r.json()
    assert body["slides"] == []
    assert "bcd slide SLIDE... --out DIR" in body["message"]
    assert str(tmp_path) not in r.text


def test_without_slides_the_api_says_how_to_start_it(predictor, slides_dir):
    plain = _client(create_app(predictor))
    r = plain.get("/api/slides")
    assert r.status_code == 404
    assert "bcd serve --slides DIR" in r.json()["detail"]
    assert "bcd slide" in r.json()["detail"]
    assert plain.get("/api/slides/a/heatmap.png").status_code == 404
    assert plain.get("/api/health").json()["slides"] is False
    shown = _client(create_app(predictor, slides=slides_dir))
    assert shown.get("/api/health").json()["slides"] is True


def test_slides_must_be_a_folder(predictor, slides_dir):
    with pytest.raises(UserError, match="not a folder"):
        create_app(predictor, slides=slides_dir / "slides.csv")


def test_bcd_serve_passes_slides_through(trained, slides_dir, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    assert main(["serve", str(trained), "--device", "cpu", "--quiet",
                 "--slides", str(slides_dir)]) == 0
    (app,) = calls
    assert len(_client(app).get("/api/slides").json()["slides"]) == 3
    assert "/api/slides" in capsys.readouterr().out


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", sorted(TYPES))
def test_each_file_is_served_with_its_type(predictor, slides_dir, name):
    client = _client(create_app(predictor, slides=slides_dir))
    url = _by_name(client.get("/api/slides").json())["a.svs"]["files"][name]
    # The listing's URLs are relative to its own.
    assert urljoin("/api/slides", url) == f"/api/slides/a/{name}"
    r = client.get(urljoin("/api/slides", url))
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == TYPES[name]
    assert r.content == (slides_dir / "a" / name).read_bytes()
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"
    # Pictures are shown; regions and tiles are downloads named after their slide.
    disposition = r.headers.get("content-disposition", "")
    assert (f'filename="a-{name}"' in disposition) == (not name.endswith(".png"))
    assert client.get(f"/api/slides/a/{name}",
                      headers={"Host": "evil.example"}).status_code == 400


def test_only_listed_files_inside_the_folder_are_served(predictor, slides_dir, tmp_path):
    """Every way out of DIR gets 404. Sent by a raw HTTP client to a real server: httpx
    (under TestClient) would resolve the ``..`` itself before sending."""
    secret = b"not a slide's file"
    (tmp_path / "heatmap.png").write_bytes(secret)           # DIR/..
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "heatmap.png").write_bytes(secret)
    (slides_dir / "unlisted").mkdir()                         # a folder slides.csv omits
    (slides_dir / "unlisted" / "heatmap.png").write_bytes(secret)
    os.symlink(elsewhere, slides_dir / "linked")              # a folder linked out of DIR
    (slides_dir / "inner").mkdir()                            # a file linked out of DIR
    os.symlink(elsewhere / "heatmap.png", slides_dir / "inner" / "heatmap.png")
    rows = list(csv.DictReader(open(slides_dir / "slides.csv", encoding="utf-8")))
    # A slides.csv that names folders outside DIR is not trusted either.
    rows += [_row(f"/x/{f}.svs", f) for f in ("linked", "inner", "..", str(elsewhere))]
    _write_table(slides_dir, rows)

    app = create_app(predictor, slides=slides_dir)
    listing = _by_name(_client(app).get("/api/slides").json())
    for name in ("linked.svs", "inner.svs", "...svs", "elsewhere.svs"):
        assert listing[name]["files"] == {}, name
    absolute = quote(str(elsewhere), safe="")
    targets = [
        "/api/slides/../heatmap.png", "/api/slides/%2e%2e/heatmap.png",
        "/api/slides/%2E%2E/heatmap.png", "/api/slides/a/../../heatmap.png",
        "/api/slides/a/..%2f..%2fheatmap.png", "/api/slides/a%2f..%2f../heatmap.png",
        f"/api/slides/{absolute}/heatmap.png", f"/api/slides/{elsewhere}/heatmap.png",
        "/api/slides//etc/passwd", "/api/slides/unlisted/heatmap.png",
        "/api/slides/linked/heatmap.png", "/api/slides/inner/heatmap.png",
        "/api/slides/a/slide.json", "/api/slides/a/..", "/api/slides/a/%2e%2e",
        "/api/slides/a/HEATMAP.PNG", "/api/slides/a/heatmap.png%00.txt",
        "/api/slides/./slides.csv", "/api/slides/a/tiles.csv/x",
    ]
    with serve_app(app, log_level="warning") as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/api/slides/a/heatmap.png")  # the way in works
            ok = conn.getresponse()
            assert (ok.status, ok.read()) == (200, (slides_dir / "a" / "heatmap.png").read_bytes())
            for target in targets:
                conn.request("GET", target)
                r = conn.getresponse()
                body = r.read()
                assert r.status == 404, target
                assert secret not in body and b"{\"settings\"" not in body, target
        finally:
            conn.close()


# ----------------------------------------------------------------------------- real slide


@pytest.mark.slow
def test_a_real_slide_is_listed_and_its_heat_map_served(predictor, tmp_path):
    pytest.importorskip("openslide", reason="bcd slide needs openslide-python openslide-bin")
    import breast_cancer_detection as bcd

    path = tmp_path / "slides" / "demo.tif"
    path.parent.mkdir()
    bcd.demo_slide(path, grid=(6, 8))
    out = tmp_path / "out"
    # The tiny test model records no scale; the demo slide's cells are at PatchCamelyon's.
    # A small thumbnail keeps the figures quick to draw.
    bcd.analyse_slides(predictor, [path], out, workers=0, progress=False,
                       model_scale_override=0.972, thumb_side=256)
    client = _client(create_app(predictor, slides=out))
    (slide,) = client.get("/api/slides").json()["slides"]
    assert slide["name"] == "demo.tif" and slide["error"] == ""
    assert slide["tiles"] > 0 and 0 <= slide["score"] <= 1
    assert slide["regions"] is not None and set(slide["files"]) == set(TYPES)
    r = client.get(urljoin("/api/slides", slide["files"]["heatmap.png"]))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size[0] > 100
    assert str(tmp_path) not in client.get("/api/slides").text
