"""The page in a real browser: headless Chromium (Debian's) driven by Playwright.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
playwright Python package; no browser is downloaded. Saves ``test-artifacts/app.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, serve_app, write_tissue_png

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no browser at {CHROMIUM}: install "
                       "Debian's chromium (apt-get install chromium), as .ci/run does"),
]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: pip install playwright")
uvicorn = pytest.importorskip("uvicorn", reason="the web app needs uvicorn")
httpx = pytest.importorskip("httpx", reason="the test reads the API with httpx")


@pytest.fixture(scope="module")
def server(trained_run):
    """The app on 127.0.0.1 at a free port, in a background thread; yields its base URL."""
    from breast_cancer_detection.app import create_app
    from breast_cancer_detection.inference import Predictor

    app = create_app(Predictor.from_checkpoint(trained_run / "best.pt", device="cpu"))
    with serve_app(app, log_level="warning") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A real BreakHis image from ../shared/data, or a synthetic one of the same size."""
    real = sorted((SHARED_DATA / "breakhis-samples").rglob("*.png"))
    if real:
        return real[0]
    path = tmp_path_factory.mktemp("sample") / "SOB_M_DC-14-2523-400-001.png"
    write_tissue_png(path, True, np.random.default_rng(0), size=(700, 460))
    return path


@pytest.mark.timeout(300)
def test_upload_shows_label_bar_and_overlay(server, sample, tmp_path):
    expected = httpx.post(f"{server}/api/predict", timeout=120,
                          files=[("files", (sample.name, sample.read_bytes(), "image/png"))])
    assert expected.status_code == 200, expected.text
    answer = expected.json()["results"][0]
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            elsewhere, problems = [], []
            page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:"))
                    else elsewhere.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            page.goto(f"{server}/")
            notice = page.get_by_role("note")
            assert notice.is_visible()
            assert "Research tool, not a medical device." in notice.inner_text()
            page.wait_for_selector("#model-summary dl.facts", timeout=30_000)
            assert "tiny" in page.inner_text("#model-summary")

            page.set_input_files("#files", str(sample))
            card = page.locator("li.card.done")
            card.wait_for(timeout=120_000)
            assert card.locator("h3").inner_text() == sample.name
            assert card.locator(".label").inner_text().lower() == answer["label"]
            assert card.locator(".p-value").inner_text() == f"{answer['p_malignant']:.3f}"

            bar = card.locator(".bar").bounding_box()
            fill = card.locator(".fill").bounding_box()
            assert fill["width"] > 0
            assert fill["width"] / bar["width"] == pytest.approx(
                max(answer["p_malignant"], 3 / bar["width"]), abs=0.02)
            marker = card.locator(".bar .marker").bounding_box()
            assert marker["x"] - bar["x"] == pytest.approx(answer["threshold"] * bar["width"],
                                                           abs=3)

            natural = "img => img.complete ? img.naturalWidth : 0"
            assert card.locator("img.cam").evaluate(natural) == 700  # tiled: CAM in the image frame
            assert card.locator("img.original").evaluate(natural) == answer["width"]
            if answer["tile_heatmap"]:
                assert card.locator("img.tiles").evaluate(natural) > 0
            for alt in card.locator("img").evaluate_all("imgs => imgs.map(i => i.alt)"):
                assert alt.strip(), "every image needs alt text"

            # A bad file gets its own card with the server's message; the good one stays.
            page.set_input_files("#files", str(not_image))
            failed = page.locator("li.card.failed")
            failed.wait_for(timeout=30_000)
            assert "415" in failed.inner_text() and "notes.txt" in failed.inner_text()
            assert page.locator("li.card.done").count() == 1

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        finally:
            browser.close()
    # The failed upload's 415 is logged by the browser as a console error; nothing else may be.
    assert [p for p in problems if "415" not in p] == []
    assert elsewhere == [], f"the page fetched from elsewhere: {elsewhere}"
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_an_answer_the_page_cannot_show_fails_its_card_and_the_queue_goes_on(server, sample,
                                                                             tmp_path):
    names = ["first.png", "second.png", "third.png"]
    for name in names:
        (tmp_path / name).write_bytes(sample.read_bytes())
    # The server's answers to the first two, replaced: one the page's script trips over (a
    # null result), one without results. The third goes to the server.
    fakes = ['{"results": [null]}', "{}"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/api/predict", lambda route: route.fulfill(
                status=200, content_type="application/json", body=fakes.pop(0))
                if fakes else route.continue_())
            page.goto(f"{server}/")
            page.set_input_files("#files", [str(tmp_path / name) for name in names])
            page.locator("li.card.done").wait_for(timeout=60_000)
            cards = {c.locator("h3").inner_text(): c for c in page.locator("li.card").all()}
            assert set(cards) == set(names)
            assert "done" in cards["third.png"].get_attribute("class")
            for name, says in (("first.png", "could not be shown"),
                               ("second.png", "held no result")):
                assert "failed" in cards[name].get_attribute("class"), name
                assert says in cards[name].locator(".error").inner_text(), name
        finally:
            browser.close()


@pytest.fixture(scope="module")
def pcam_server():
    """The app serving the bundled PCam model, whose card denies BreakHis-sized images."""
    from breast_cancer_detection.app import create_app
    from breast_cancer_detection.inference import Predictor

    app = create_app(Predictor.from_pretrained("pcam-patch-cnn", device="cpu"))
    with serve_app(app, log_level="warning") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.timeout(300)
def test_the_page_states_the_models_own_scope_and_warns_of_an_image_outside_it(
        pcam_server, tmp_path):
    from breast_cancer_detection.pretrained import trained_model

    entry = trained_model("pcam-patch-cnn")
    image = tmp_path / "biopsy1.png"  # no BreakHis name: the warning comes from its size
    write_tissue_png(image, True, np.random.default_rng(1), size=(700, 460))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{pcam_server}/")
            page.wait_for_selector("#model-summary dl.facts", timeout=30_000)
            facts = dict(zip(page.locator("#model-summary dt").all_inner_texts(),
                             page.locator("#model-summary dd").all_inner_texts()))
            assert facts["Intended use"] == entry.intended_use
            assert facts["Not for"] == entry.not_for
            assert "patients per subset" not in facts["Trained on"]  # PCam has no patient ids

            page.set_input_files("#files", str(image))
            card = page.locator("li.card.done")
            card.wait_for(timeout=120_000)
            warning = card.locator(".warning")
            assert "cut into 126 tiles of 96 px" in warning.inner_text()
            # The overlay keeps the image's 700:460 aspect, and every heat map has its scale.
            box = card.locator("img.cam").bounding_box()
            assert box["width"] / box["height"] == pytest.approx(700 / 460, rel=0.03)
            assert card.locator(".legend .gradient.viridis").count() == 1
            assert card.locator(".legend .gradient.cividis").count() == 1
            legend = card.locator(".legend .gradient.cividis").bounding_box()
            mark = card.locator(".legend .gradient.cividis .marker").bounding_box()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app-out-of-scope.png"), full_page=True)
        finally:
            browser.close()
    threshold = httpx.get(f"{pcam_server}/api/model", timeout=30).json()["threshold"]["value"]
    assert mark["x"] - legend["x"] == pytest.approx(threshold * legend["width"], abs=3)
