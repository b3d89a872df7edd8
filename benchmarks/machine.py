"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository."""
SHARED = ROOT.parent / "shared"
"""The real data and the frozen seed pipeline, beside the clone."""
PCAM = SHARED / "data" / "pcam-subset"
"""PatchCamelyon's train/ and valid/ folders (0/ and 1/ each)."""
SEED = SHARED / "baseline" / "seed_pipeline.py"
"""The seed notebook's pipeline: the yardstick of every ratio."""


def cpu_info() -> dict:
    """The CPU's model name and the vector/matrix extensions oneDNN can use."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        import platform

        model = platform.processor() or model
    return {"cpu": model, "cpus": os.cpu_count(),
            "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "amx": "amx_tile" in flags}


def emit(record: dict) -> dict:
    """Prints one JSON line (floats to 4 decimals) and returns the record."""
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in record.items()}), flush=True)
    return record
