"""Errors whose message already says what the user should do next."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's data, files or settings; the CLI prints it without a traceback."""
