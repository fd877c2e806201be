"""Errors of the export toolchain, on top of the runtime's tree."""

from __future__ import annotations

from edgeperso import EdgePersoError


class ExportError(EdgePersoError):
    """The export cannot proceed; the message says what to change."""


class ParityError(ExportError):
    """The exported graphs disagree with torch beyond a configured threshold."""
