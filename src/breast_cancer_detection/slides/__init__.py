"""Whole-slide images: `bcd slide`.

    reader.py   open a slide (OpenSlide), its scale (mpp), a bounded-memory thumbnail, the
                tile Dataset that DataLoader workers read regions with, and TiffLevel, which
                cuts tiles from a tiled TIFF's own decoded tiles (same pixels, faster)
    tissue.py   tissue mask on the thumbnail; the tile grid at the model's scale
    regions.py  connected regions above the threshold as GeoJSON polygons (QuPath)
    run.py      analyse_slide / analyse_slides: tiles.csv, heatmap.png, tissue.png,
                regions.geojson, top_tiles.png per slide; slides.csv; shards
    make.py     write_slide: pyramidal tiled TIFFs that OpenSlide opens; demo_slide
"""

from .make import demo_slide, write_slide
from .reader import SLIDE_SUFFIXES, SlideError, collect_slides, open_slide, slide_mpp
from .run import SlideResult, analyse_slide, analyse_slides, model_mpp, parse_shard
from .tissue import TileGrid, otsu_threshold, tissue_mask

__all__ = [
    "SLIDE_SUFFIXES", "SlideError", "SlideResult", "TileGrid", "analyse_slide",
    "analyse_slides", "collect_slides", "demo_slide", "model_mpp", "open_slide",
    "otsu_threshold", "parse_shard", "slide_mpp", "tissue_mask", "write_slide",
]
