"""The whole-slide routes: /api/slides and /api/slides/{folder}/{name}, the results of
``bcd slide``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse

from .dependencies import slides_of
from .schemas import error_responses
from .slides import SLIDE_FILES, Slides

router = APIRouter()
"""The routes of this module, for ``app.include_router``."""

SlidesDep = Annotated[Slides | None, Depends(slides_of)]

NOT_SHOWN = ("this server shows no whole slides: start it with `bcd serve --slides DIR`, "
             "DIR being the folder of `bcd slide SLIDE... --out DIR`.")
"""The 404 of the slide routes on a server started without ``--slides``."""


@router.get("/api/slides", tags=["slides"],
            responses=error_responses(_404="The server was started without --slides."))
def list_slides(slides: SlidesDep) -> Any:
    """The slides of ``bcd slide --out DIR``, one per row of its slides.csv, read again
    whenever it changes.

    Each has its file name (never its path), score, tiles, tumour tiles, tissue mm²,
    error (empty, or why it failed), folder, number of regions and the largest ones, and
    ``files``: the URLs of its files, relative to this listing's
    (``slides/FOLDER/heatmap.png`` is ``/api/slides/FOLDER/heatmap.png``). ``message``
    says why the list is empty when slides.csv is missing or unreadable.
    """
    if slides is None:
        return JSONResponse({"detail": NOT_SHOWN}, 404)
    return slides.listing()


@router.get("/api/slides/{folder}/{name}", tags=["slides"],
            response_class=FileResponse,
            responses={200: {"content": {t: {} for t in SLIDE_FILES.values()},
                             "description": "The file."},
                       **error_responses(_404="Not a file served here, or no --slides.")})
def slide_file(folder: str, name: str, slides: SlidesDep) -> Any:
    """One file of a slide listed in slides.csv: heatmap.png, tissue.png, top_tiles.png,
    regions.geojson (QuPath: File > Import objects) or tiles.csv."""
    path = None if slides is None else slides.file(folder, name)
    if path is None:
        detail = NOT_SHOWN if slides is None else (
            f"no such slide file; a slide listed by /api/slides has "
            f"{', '.join(SLIDE_FILES)}.")
        return JSONResponse({"detail": detail}, 404)
    # The data files are downloads, named after their slide; the pictures are shown.
    download = None if name.endswith(".png") else f"{folder}-{name}"
    return FileResponse(path, media_type=SLIDE_FILES[name], filename=download)
