"""Errors of the export toolchain, on top of the runtime's tree.

    EdgePersoError
    └── ExportError                  the export cannot proceed; the message says what to change
        ├── ExportInputError         a bad argument, output path or source file
        │                            (also edgeperso.InvalidInputError, hence a ValueError)
        ├── ExportUnsupportedError   a valid model this exporter does not support
        │                            (also edgeperso.UnsupportedError)
        └── ParityError              the exported graphs disagree with torch

Catch ExportError for every export failure; the two mixed-in classes let a caller that knows
only the runtime's tree tell a wrong call from an unsupported model.
"""

from __future__ import annotations

from edgeperso import EdgePersoError, InvalidInputError, UnsupportedError


class ExportError(EdgePersoError):
    """The export cannot proceed; the message says what to change."""


class ExportInputError(ExportError, InvalidInputError):
    """An export argument, the output path or a file of the source model is invalid."""


class ExportUnsupportedError(ExportError, UnsupportedError):
    """The source model is valid but uses something this exporter cannot export faithfully."""


class ParityError(ExportError):
    """The exported graphs disagree with torch beyond a configured threshold."""
