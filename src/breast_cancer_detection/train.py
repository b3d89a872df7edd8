"""`python -m breast_cancer_detection.train ...` = `bcd train ...`, the torchrun entry point."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
