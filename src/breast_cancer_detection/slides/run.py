"""`bcd slide`: score every tissue tile of whole slides, and write what a pathologist looks at.

Per slide, in ``OUT/<folder>/`` (the slide's stem, made safe: :func:`slide_folders`):
``tiles.csv``, ``heatmap.png``, ``tissue.png``, ``regions.geojson``, ``top_tiles.png`` and
``slide.json`` (the summary, and what it was made with: a slide already done with the same
model and settings is not redone). In ``OUT/``: ``slides.csv``, one row per slide.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..data.batch_augment import normalize_batch
from ..data.datasets import run_lanes
from ..errors import UserError
from ..files import (
    atomic_write_text,
    from_spreadsheet_safe,
    jsonable,
    spreadsheet_safe,
    unique_names,
)
from ..scope import model_scale
from .limits import MAX_SLIDE_PIXELS, SlideError, check_cost, check_deadline
from .reader import (
    TileDataset,
    open_slide,
    positive_mpp,
    slide_mpp,
    thumbnail,
)
from .regions import feature_collection, region_features
from .tissue import TileGrid, tissue_mask

if TYPE_CHECKING:
    import torch

    from ..inference import Predictor

DEFAULT_TOP_K = 10
DEFAULT_SLIDE_TIMEOUT = 3600.0
"""Seconds one slide may take (``--slide-timeout``) before it gets an error row."""
BLANK_SHARE = 0.25
"""A slide whose tissue tiles (by the thumbnail's mask) read as blank glass this often gets
an error row, not a score: the level read has no data where the thumbnail shows tissue."""
GALLERY = 16
SUMMARY = "slide.json"
OUTPUTS = ("tiles.csv", "heatmap.png", "tissue.png", "regions.geojson", "top_tiles.png")
"""The files a finished slide's folder holds beside :data:`SUMMARY`."""
COLUMNS = ["slide", "score", "tiles", "tumour_tiles", "tissue_mm2", "seconds", "tiles_per_s",
           "mpp", "mpp_source", "level", "error", "folder"]


def default_workers() -> int:
    """Tile-reading processes when none are asked for: none on a machine of 2 cores or fewer,
    where reading a tile costs a fraction of scoring it and a worker process only takes
    time from the model (docs/benchmarks.md, "Whole slides"); else 2."""
    return 0 if (os.cpu_count() or 1) <= 2 else 2


def blank_tiles(x: torch.Tensor) -> np.ndarray:
    """Which tiles of a uint8 batch ``(N, 3, H, W)`` are blank: 98% or more of their pixels
    near-white (every channel 230 or more) or exactly black, as missing pixels come out."""
    white = (x >= 230).all(dim=1)
    black = (x == 0).all(dim=1)
    return ((white | black).float().mean(dim=(1, 2)) >= 0.98).numpy()


def score_tiles(predictor: Predictor, dataset: TileDataset, *, batch_size: int, workers: int,
                tta: bool = False, bar=None, deadline: float | None = None,
                timeout: float | None = None, blank: np.ndarray | None = None) -> np.ndarray:
    """P(malignant) of every tile of ``dataset``, read in batches, in
    :meth:`Predictor.lanes` lanes when tiles are read in this process.

    An error in any lane (a damaged region) stops the others after their batch in hand and
    is raised here (:func:`run_lanes`); so does passing ``deadline`` (``time.monotonic``),
    checked before each batch is scored. ``blank``, an array of ``len(dataset)`` booleans,
    gets which tiles read as blank (:func:`blank_tiles`).
    """
    prob = np.full(len(dataset), np.nan, np.float32)
    lanes = predictor.lanes(workers) if len(dataset) > batch_size else 1

    def score(model: Predictor, x: torch.Tensor, idx: torch.Tensor) -> None:
        check_deadline(deadline, dataset.path, timeout)
        if blank is not None:
            blank[idx.numpy()] = blank_tiles(x)
        x = normalize_batch(x, model.pre)
        prob[idx.numpy()] = model.probabilities(x, tta=tta, batch_size=batch_size)[:, 1]

    if lanes == 1:
        for x, idx in dataset.batches(batch_size, workers):
            score(predictor, x, idx)
            if bar is not None:
                bar.update(len(idx))
        return prob
    model = predictor.for_lanes(lanes)
    batches = dataset.batches_by_index(batch_size, multiple_of=lanes)

    def work(k: int) -> int:
        x, idx = batches[k]
        score(model, x, idx)
        return len(idx)

    dataset.open()  # before the lanes, which share the handle (OpenSlide reads are thread-safe)
    run_lanes(lanes, len(batches), work, bar)
    return prob


def model_mpp(predictor: Predictor, override: float | None = None) -> tuple[float, str]:
    """The scale (um/px) the model was trained at, and where that figure came from.

    In order: ``override`` (``--model-mpp``), then :func:`bcd.scope.model_scale` (what the
    checkpoint, an ONNX export or the registry states; a BreakHis checkpoint of one
    magnification, approximately).

    Raises:
        UserError: none of them is known.
    """
    if override is not None:
        return positive_mpp(override, "--model-mpp"), "--model-mpp"
    scale = model_scale(predictor)
    if scale is not None:
        return scale
    raise UserError(
        "the model does not say at what scale it was trained, so slide tiles cannot be cut to "
        "match it. Give it with --model-mpp UM_PER_PIXEL (0.972 for PatchCamelyon), or train "
        "with `mpp:` set in the config (or one BreakHis magnification).")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``; None -> the torchrun rank and world size when
    run under torchrun with more than one process, else None."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: write I/N with 0 <= I < N, e.g. --shard 0/4 for the "
                        "first of four processes.")
    return i, n


@dataclass
class SlideResult:
    """One slide's summary: a row of ``slides.csv``.

    ``score`` is the mean P(tumour) of the ``top_k`` highest tiles (the slide's most
    suspicious area, insensitive to how much normal tissue surrounds it); ``tumour_tiles`` is
    the number at or above the model's threshold. ``error`` is empty, or why the slide
    could not be analysed.
    """

    slide: str
    score: float = float("nan")
    tiles: int = 0
    tumour_tiles: int = 0
    tissue_mm2: float = float("nan")
    seconds: float = 0.0
    tiles_per_s: float = float("nan")
    mpp: float = float("nan")
    mpp_source: str = ""
    level: int = -1
    error: str = ""
    folder: str = ""
    settings: dict[str, Any] = field(default_factory=dict, repr=False)
    reused: bool = field(default=False, repr=False)
    """The outputs of an earlier run with the same model and settings, not redone."""

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in COLUMNS}


def _model_identity(predictor: Predictor) -> dict[str, Any]:
    """Which weights score the tiles: the checkpoint's weights digest and, for an ONNX model,
    its file's SHA-256 (a retrained model with the same architecture differs in both);
    computed once per predictor."""
    digests = getattr(predictor, "_slide_digests", None)  # the costly part, hashed once
    if digests is None:
        from ..data.download import sha256_of
        from ..export import weights_digest

        ckpt = predictor.checkpoint
        path = getattr(predictor.model, "path", None) if predictor.backend == "onnx" else None
        digests = {"weights": None if ckpt is None else weights_digest(ckpt),
                   "onnx": None if path is None else sha256_of(path)}
        predictor._slide_digests = digests
    return {"arch": predictor.arch, "threshold": predictor.threshold,
            "backend": predictor.backend_note, **digests}


_FLOATS = {"score", "tissue_mm2", "seconds", "tiles_per_s", "mpp"}

# Bumped whenever the tiles a slide is cut into change for the same settings (2: the grid
# steps by whole level pixels), so that earlier outputs are redone, not reused.
GRID_VERSION = 2


def _settings(predictor: Predictor, path: Path, **kw) -> dict[str, Any]:
    """What a slide's outputs depend on: a slide done with the same settings is reused."""
    from .. import __version__

    st = path.stat()
    model = _model_identity(predictor)

    return jsonable({"version": __version__, "grid": GRID_VERSION, "slide": str(path.resolve()),
                     "size": st.st_size, "mtime": st.st_mtime_ns, "model": model, **kw})


def _done(folder: Path, settings: dict[str, Any]) -> SlideResult | None:
    """The summary of a slide done before with ``settings``, when every one of its output
    files is still there; else None (the slide is redone)."""
    try:
        d = json.loads((folder / SUMMARY).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(d, dict) or d.get("settings") != settings:
        return None
    if not all((folder / name).is_file() for name in OUTPUTS):
        return None
    d.pop("settings")
    # JSON keeps NaN as null (a slide with no tissue tiles has no score): NaN again.
    return SlideResult(**{k: float("nan") if v is None and k in _FLOATS else v
                          for k, v in d.items() if k in COLUMNS}, settings=settings, reused=True)


def analyse_slide(predictor: Predictor, path: str | Path, out_dir: str | Path, *,
                  model_scale: tuple[float, str] | None = None, mpp: float | None = None,
                  tissue_threshold: float | None = None, min_tissue: float = 0.5,
                  batch_size: int = 64, workers: int | None = None, tta: bool = False,
                  top_k: int = DEFAULT_TOP_K, thumb_side: int = 2048, progress: bool = True,
                  force: bool = False, timeout: float | None = DEFAULT_SLIDE_TIMEOUT,
                  max_pixels: float = MAX_SLIDE_PIXELS) -> SlideResult:
    """Scores every tissue tile of one slide and writes its outputs into ``out_dir``.

    Tiles are the model's field of view (its input side at its training scale), read from
    the coarsest pyramid level that has the resolution, on a grid over level 0; a tile is
    read only when at least ``min_tissue`` of it is tissue on the thumbnail's mask. Workers
    read and resize tiles while the model runs; memory is bounded by the batch, the
    thumbnail and the tile grid, not by the slide.

    Args:
        predictor: The model (torch or ONNX backend).
        path: The slide.
        out_dir: The slide's output folder.
        model_scale: ``(mpp, source)`` from :func:`model_mpp`; None works it out.
        mpp: The slide's um/px when its metadata lacks it (``--mpp``).
        tissue_threshold: Saturation 0-1 for the tissue mask; None: Otsu's.
        min_tissue: Share of a tile that must be tissue for it to be read.
        batch_size: Tiles per forward pass.
        workers: DataLoader processes reading tiles (0: read in this process; None:
            :func:`default_workers`).
        tta: Average the 8 flips and quarter turns of each tile.
        top_k: Tiles averaged into the slide score.
        thumb_side: Long side of the thumbnail the mask and heat map are drawn on (raised
            when a tile would cover under 4 thumbnail pixels, up to 8192).
        progress: A progress bar with tiles/s.
        force: Redo a slide whose outputs exist for the same settings.
        timeout: Seconds this slide may take before it gets an error row (checked between
            thumbnail strips and tile batches); None for no limit.
        max_pixels: Level-0 pixels its header may claim (see
            :func:`~breast_cancer_detection.slides.reader.check_cost`).

    Returns:
        The summary; on failure ``error`` says why (nothing raised), so other slides go on.
    """
    path, out_dir = Path(path), Path(out_dir)
    t0 = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout
    result = SlideResult(slide=str(path), folder=out_dir.name)
    try:
        if model_scale is None:
            model_scale = model_mpp(predictor)
        if not path.is_file():
            raise SlideError(f"{path}: no such file.")
        settings = _settings(predictor, path, model_mpp=model_scale[0], mpp=mpp, tta=tta,
                             tissue_threshold=tissue_threshold, min_tissue=min_tissue,
                             top_k=top_k, thumb_side=thumb_side)
        if not force and (done := _done(out_dir, settings)) is not None:
            return done
        # Outputs are about to be replaced: the old ones must not stand for this run's.
        _remove_outputs(out_dir)
        result.settings = settings
        _analyse(predictor, path, out_dir, result, model_scale=model_scale, mpp=mpp,
                 tissue_threshold=tissue_threshold, min_tissue=min_tissue,
                 batch_size=batch_size, workers=workers, tta=tta, top_k=top_k,
                 thumb_side=thumb_side, progress=progress, deadline=deadline,
                 timeout=timeout, max_pixels=max_pixels)
    except (UserError, OSError, ValueError, RuntimeError, MemoryError, ArithmeticError) as e:
        # RuntimeError covers OpenSlide's errors raised in DataLoader workers; ArithmeticError
        # a header whose figures divide by zero or overflow.
        result.error = _one_line(e)
        # An error row: no earlier outputs of this slide may be shown as if they were its.
        _remove_outputs(out_dir)
    result.seconds = round(time.perf_counter() - t0, 3)
    if not result.error:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / SUMMARY, json.dumps(jsonable(asdict(result)), indent=2))
    return result


def _remove_outputs(folder: Path) -> None:
    """Deletes a slide's output files (and its summary) from ``folder``, if there."""
    for name in (SUMMARY, *OUTPUTS):
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError:  # a folder where a file should be: it was never ours to serve
            pass


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, UserError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _analyse(predictor: Predictor, path: Path, out_dir: Path, result: SlideResult, *,
             model_scale: tuple[float, str], mpp: float | None,
             tissue_threshold: float | None, min_tissue: float, batch_size: int,
             workers: int | None,
             tta: bool, top_k: int, thumb_side: int, progress: bool,
             deadline: float | None = None, timeout: float | None = None,
             max_pixels: float = MAX_SLIDE_PIXELS) -> None:
    from tqdm.auto import tqdm

    slide = open_slide(path)
    try:
        check_cost(slide, path, thumb_side, max_pixels=max_pixels)  # the header, no pixels
        s_mpp, result.mpp_source = slide_mpp(slide, path, mpp)
        result.mpp = round(s_mpp, 6)
        grid = TileGrid.for_slide(slide, size=predictor.pre.size, slide_mpp=s_mpp,
                                  model_mpp=model_scale[0])
        result.level = grid.level
        side = min(8192, max(thumb_side, math.ceil(4 * max(slide.dimensions) / grid.tile0)))
        check_cost(slide, path, side, max_pixels=max_pixels)
        thumb, tds = thumbnail(slide, side, path, deadline=deadline, timeout=timeout)
    finally:
        slide.close()
    mask, cut = tissue_mask(thumb, threshold=tissue_threshold,
                            min_area=round((grid.tile0 / tds) ** 2))
    result.tissue_mm2 = round(float(mask.sum()) * (tds * s_mpp) ** 2 / 1e6, 4)
    rows, cols = np.nonzero(grid.tissue_fraction(mask, tds) >= min_tissue)
    xy = grid.origins(rows, cols)
    dataset = TileDataset(path, xy, grid.level, grid.read_size, grid.size,
                          grid.level_downsample)
    workers = default_workers() if workers is None else workers
    try:  # the slide and TIFF files closed however scoring ends
        t_read = time.perf_counter()
        blank = np.zeros(len(xy), bool)
        with tqdm(total=len(xy), desc=path.name, unit="tile", disable=not progress) as bar:
            prob = score_tiles(predictor, dataset, batch_size=batch_size, workers=workers, tta=tta,
                               bar=bar, deadline=deadline, timeout=timeout, blank=blank)
        elapsed = time.perf_counter() - t_read
        if len(xy) and not np.isfinite(prob).all():
            raise RuntimeError("the model gave NaN or infinity for some tiles: its weights are "
                               "damaged or it overflowed; check the checkpoint.")
        if len(xy) and blank.mean() >= BLANK_SHARE:
            raise SlideError(
                f"{path}: {int(blank.sum())} of {len(xy)} tiles the thumbnail shows as tissue "
                f"read as blank (white or black) from level {grid.level}: that level has no "
                "data there (missing or empty tiles), so no score is given. Check the file, "
                "or copy it again from its source.")

        heat = np.full((grid.rows, grid.cols), np.nan, np.float32)
        heat[rows, cols] = prob
        result.tiles = len(xy)
        result.tumour_tiles = int((prob >= predictor.threshold).sum())
        result.tiles_per_s = (round(len(xy) / elapsed, 2) if elapsed > 0 and len(xy)
                              else float("nan"))
        if len(xy):
            result.score = round(float(np.sort(prob)[::-1][:top_k].mean()), 6)
        _write_outputs(out_dir, path, predictor, grid, xy, prob, heat, thumb, tds, mask, cut,
                       s_mpp, dataset)
    finally:
        dataset.close()


def _write_outputs(out_dir: Path, path: Path, predictor: Predictor, grid: TileGrid,
                   xy: np.ndarray, prob: np.ndarray, heat: np.ndarray, thumb: np.ndarray,
                   tds: float, mask: np.ndarray, cut: float, s_mpp: float,
                   dataset: TileDataset) -> None:
    from ..files import atomic_write
    from ..plots import plot_slide_heatmap, plot_tile_gallery, plot_tissue, save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    width = round(grid.tile0)
    tiles = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "width": width, "height": width,
                          "p_malignant": np.round(prob, 6)})
    atomic_write(out_dir / "tiles.csv",
                 lambda f: f.write(tiles.to_csv(index=False).encode("utf-8")))
    tile_mm2 = (grid.tile0 * s_mpp) ** 2 / 1e6
    features = region_features(heat, predictor.threshold, grid.tile0, tile_area_mm2=tile_mm2)
    atomic_write_text(out_dir / "regions.geojson", json.dumps(feature_collection(features)))
    extent = (grid.cols * grid.tile0 / tds, grid.rows * grid.tile0 / tds)
    save_figure(plot_slide_heatmap(thumb, heat, extent, threshold=predictor.threshold,
                                   title=path.name), out_dir / "heatmap.png")
    save_figure(plot_tissue(thumb, mask, title=f"{path.name}: tissue (saturation > "
                                               f"{cut:.2f})"), out_dir / "tissue.png")
    top = np.argsort(-prob)[:GALLERY]
    save_figure(plot_tile_gallery([dataset.read(int(i)) for i in top], prob[top], xy[top],
                                  title=f"{path.name}: highest P(tumour) tiles"),
                out_dir / "top_tiles.png")


def analyse_slides(predictor: Predictor, paths: list[Path], out: str | Path, *,
                   shard: tuple[int, int] | None = None, model_scale_override: float | None = None,
                   **kwargs) -> pd.DataFrame:
    """Analyses slides one after another into ``out/<stem>/`` and writes ``out/slides.csv``.

    ``slides.csv`` is rewritten after every slide, so an interrupted run keeps what it
    finished (and a rerun skips it). With ``shard=(i, n)`` this process takes every n-th
    slide from the i-th on, writes its rows to ``slides.part-i-of-n.partial.csv`` as it
    goes and renames it ``slides.part-i-of-n.csv`` when its share is done; a process that
    finds all n finished parts then merges them into ``slides.csv`` (each finished part is
    final, so any process that merges writes the same complete table).

    Args:
        predictor: The model.
        paths: Slide files (see :func:`bcd.slides.collect_slides`).
        out: The output folder.
        shard: ``(i, n)``; None: all slides here.
        model_scale_override: ``--model-mpp``.
        **kwargs: Passed to :func:`analyse_slide`.

    Returns:
        This process's rows, one per slide; ``attrs["reused"]`` names the slides whose outputs
        from an earlier run with the same model and settings were kept (not redone).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale = model_mpp(predictor, model_scale_override)
    folders = slide_folders(paths)
    jobs = list(zip(paths, folders))
    if shard is not None:
        jobs = jobs[shard[0]::shard[1]]
    final = out / ("slides.csv" if shard is None else
                   f"slides.part-{shard[0]}-of-{shard[1]}.csv")
    table = final if shard is None else final.with_suffix(".partial.csv")
    if shard is not None:
        # A previous run's part and table must not pass for this run's.
        final.unlink(missing_ok=True)
        (out / "slides.csv").unlink(missing_ok=True)
    rows: list[dict[str, Any]] = []
    reused = []
    for path, folder in jobs:
        r = analyse_slide(predictor, path, out / folder, model_scale=scale, **kwargs)
        rows.append(r.row())
        if r.reused:
            reused.append(r.slide)
        _write_csv(table, pd.DataFrame(rows, columns=COLUMNS))
    if not rows:
        _write_csv(table, pd.DataFrame(columns=COLUMNS))
    if shard is not None:
        table.replace(final)
        _merge_parts(out, shard[1], folders)
    result = pd.DataFrame(rows, columns=COLUMNS)
    result.attrs["reused"] = reused  # slides whose earlier outputs stand (no --force)
    return result


def slide_folders(paths: list[Path]) -> list[str]:
    """A distinct output folder name per slide that stays inside ``--out`` and never takes
    the name of the run's own files: the slide's stem with anything but letters, digits
    (of any script), ``.``, ``_`` and ``-`` replaced by ``_``, and ``slide-`` put before one
    that starts with a dot (``..``, ``...``) or with ``slides.`` (``slides.csv.tif``), or is
    empty. The slide's own name stays in its row of ``slides.csv``."""
    import re

    safe = []
    for p in paths:
        name = re.sub(r"[^\w.-]", "_", Path(p).stem)[:120]
        if not name or name.startswith(".") or name.lower().startswith("slides."):
            name = f"slide-{name}"
        safe.append(name)
    return unique_names(safe, "slide")


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    """``table`` as CSV, text that a spreadsheet would run as a formula written as text
    (``files.spreadsheet_safe``); :func:`read_slides_csv` reads the names back."""
    atomic_write_text(path, spreadsheet_safe(table).to_csv(index=False))


def read_slides_csv(path: str | Path) -> pd.DataFrame:
    """A ``slides.csv`` (or a shard's part) as written, its text cells as they were before
    :func:`_write_csv` guarded them against spreadsheets."""
    text = {c: str for c in ("slide", "mpp_source", "error", "folder")}
    table = pd.read_csv(path, dtype=text, keep_default_na=False,
                        na_values={c: [""] for c in COLUMNS if c not in text})
    return from_spreadsheet_safe(table)


def _merge_parts(out: Path, n: int, order: list[str]) -> Path | None:
    """Merges ``slides.part-*-of-n.csv`` into ``slides.csv`` once all n exist and each holds
    the slides of its share of ``order``."""
    parts = [out / f"slides.part-{i}-of-{n}.csv" for i in range(n)]
    if not all(p.exists() for p in parts):
        return None
    tables = [read_slides_csv(p) for p in parts]
    if any(list(t.get("folder", [])) != order[i::n] for i, t in enumerate(tables)):
        return None  # a part of another run (other slides): the shard that writes it merges
    merged = pd.concat(tables, ignore_index=True)
    rank = {f: k for k, f in enumerate(order)}
    merged = merged.sort_values("folder", key=lambda s: s.map(rank)).reset_index(drop=True)
    _write_csv(out / "slides.csv", merged)
    return out / "slides.csv"
