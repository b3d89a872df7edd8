"""Connected regions of tiles at or above the threshold, as GeoJSON polygons QuPath imports.

Each region is the exact outline of its tiles (edge-connected tiles form one region), in
level-0 pixel coordinates; holes are kept. QuPath: File > Import objects, or drag the file
onto the open slide.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Edge directions (dx, dy) in image coordinates (y down); the region lies on the right of
# every edge. A left turn, for each heading:
_LEFT_TURN = {(1, 0): (0, -1), (0, -1): (-1, 0), (-1, 0): (0, 1), (0, 1): (1, 0)}


def _boundary_edges(cells: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed boundary edges (start -> ends) of the True cells, region on the right."""
    padded = np.pad(cells, 1)
    inner = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (  # (neighbour shift, start corner, end corner) of each side of cell (r, c)
        ((-1, 0), (0, 0), (1, 0)),  # top: west to east
        ((0, 1), (1, 0), (1, 1)),   # right: north to south
        ((1, 0), (1, 1), (0, 1)),   # bottom: east to west
        ((0, -1), (0, 1), (0, 0)),  # left: south to north
    )
    for (dr, dc), (sx, sy), (ex, ey) in sides:
        neighbour = padded[1 + dr:padded.shape[0] - 1 + dr, 1 + dc:padded.shape[1] - 1 + dc]
        for r, c in zip(*np.nonzero(inner & ~neighbour)):
            edges.setdefault((c + sx, r + sy), []).append((c + ex, r + ey))
    return edges


def _rings(cells: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed rings (first point repeated) tracing the cells' boundary.

    At a corner shared by two diagonal cells two boundary walks meet; the walk always turns
    left there, which pairs each arriving edge with one leaving edge and keeps a hole that
    touches the outline at a corner a ring of its own (a valid polygon with a hole).
    """
    edges = _boundary_edges(cells)
    rings = []
    while edges:
        start = next(iter(edges))
        first = (start, edges[start][0])
        ring, point, heading = [start], start, None
        while True:
            ends = edges[point]
            if heading is None:
                pick = first[1]
            else:
                turn = _LEFT_TURN[heading]
                if point == start and (point[0] + turn[0], point[1] + turn[1]) == first[1]:
                    break  # the start's other ring goes on from here
                pick = next((e for e in ends if (e[0] - point[0], e[1] - point[1]) == turn),
                            ends[0])
            ends.remove(pick)
            if not ends:
                del edges[point]
            heading = (pick[0] - point[0], pick[1] - point[1])
            point = pick
            ring.append(point)
            if point not in edges:  # back at the start with its edge taken
                break
        rings.append(_simplify(ring))
    return rings


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drops the points in the middle of straight runs."""
    pts = ring[:-1]
    n = len(pts)
    keep = []
    for i in range(n):
        a, b, c = pts[i - 1], pts[i], pts[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) != (b[1] - a[1]) * (c[0] - b[0]):
            keep.append(b)
    return keep + keep[:1]


def _signed_area(ring: list[tuple[int, int]]) -> float:
    """Shoelace area; positive for an outer ring (region on the right, y down)."""
    x = np.array([p[0] for p in ring], float)
    y = np.array([p[1] for p in ring], float)
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


def _inside(point: tuple[float, float], ring: list[tuple[int, int]]) -> bool:
    """Even-odd ray casting."""
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _polygons(cells: np.ndarray) -> list[list[list[tuple[int, int]]]]:
    """Polygons (outer ring, then holes) in cell units."""
    outers, holes = [], []
    for ring in _rings(cells):
        (outers if _signed_area(ring) > 0 else holes).append(ring)
    polys = [[o] for o in outers]
    for h in holes:
        # A point half a cell to the left of the hole's first edge lies inside the hole.
        (x1, y1), (x2, y2) = h[0], h[1]
        dx, dy = np.sign(x2 - x1), np.sign(y2 - y1)
        probe = ((x1 + x2) / 2 + dy * 0.5, (y1 + y2) / 2 - dx * 0.5)
        owner = next((p for p in polys if _inside(probe, p[0])), polys[0] if polys else None)
        if owner is not None:
            owner.append(h)
    return polys


def region_features(prob: np.ndarray, threshold: float, tile0: float, *,
                    tile_area_mm2: float) -> list[dict]:
    """GeoJSON features, one per connected region of tiles with ``prob >= threshold``.

    Args:
        prob: ``(rows, cols)`` P(tumour) per tile; NaN off tissue.
        threshold: The model's decision threshold.
        tile0: Tile side in level-0 pixels (coordinates are multiplied by it).
        tile_area_mm2: One tile's area, for each region's ``area_mm2``.
    """
    hot = np.nan_to_num(prob, nan=-1.0) >= threshold
    labels, n = ndimage.label(hot)
    features = []
    for k in range(1, n + 1):
        cells = labels == k
        values = prob[cells]
        polys = [[[[round(x * tile0), round(y * tile0)] for x, y in ring] for ring in poly]
                 for poly in _polygons(cells)]
        geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1 else
                    {"type": "MultiPolygon", "coordinates": polys})
        features.append({
            "type": "Feature", "geometry": geometry,
            "properties": {
                "objectType": "annotation", "name": f"region {k}",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "tiles": int(cells.sum()), "area_mm2": round(float(cells.sum()) * tile_area_mm2,
                                                            6),
                "mean_p": round(float(values.mean()), 4), "max_p": round(float(values.max()), 4),
            }})
    features.sort(key=lambda f: -f["properties"]["tiles"])
    return features


def feature_collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}
