"""Silence the build-time libraries' own chatter; the CLI draws its own progress."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

# torch.onnx logs its optional-op registry and prints progress; optimum's quantizer warns that
# a bare .onnx file has no config.json; onnxruntime's quantizer suggests pre-processing on the
# root logger. None of it is actionable for a user of edgeperso-export.
_LOGGERS = ("torch.onnx", "optimum", "onnxruntime", "root", "onnx_ir", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    loggers = [logging.getLogger(n if n != "root" else None) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
