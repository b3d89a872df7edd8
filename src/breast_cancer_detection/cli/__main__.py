"""`python -m breast_cancer_detection.cli ...` = `bcd ...`."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
