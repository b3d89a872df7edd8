"""Errors whose message already says what the user should do next."""

from __future__ import annotations

DISTRIBUTION = "bcd-histopathology"
"""The project's name on PyPI (``pip install bcd-histopathology``); the import name stays
``breast_cancer_detection`` and the command ``bcd``. (``breast-cancer-detection`` on PyPI is
an unrelated project.)"""


def install_hint(extra: str) -> str:
    """How to install an optional extra, from PyPI and from a clone: e.g.
    ``pip install "bcd-histopathology[slides]" (in a clone: pip install -e ".[slides]")``."""
    return f'pip install "{DISTRIBUTION}[{extra}]" (in a clone: pip install -e ".[{extra}]")'


class UserError(Exception):
    """A problem with the user's data, files or settings; the CLI prints it without a traceback."""
