"""onnxruntime, imported with its telemetry off unless the app has chosen otherwise.

The official onnxruntime wheels for Linux and macOS (1.32 here) record telemetry by default:
importing onnxruntime writes a persistent device id and an event queue under
~/.cache/Microsoft/DeveloperTools/.onnxruntime, to be uploaded to Microsoft's collector
(process, session, model and execution-provider events). An SDK whose promise is that nothing
about a user leaves their device must not make the app report on its users unasked.

`ORT_DISABLE_TELEMETRY=1` turns all of it off, but onnxruntime reads it once, when it is
first imported: every module of this project imports onnxruntime from here. An app that
sets the variable itself (to 0 as well) keeps its choice. An app that imported onnxruntime
before edgeperso gets the runtime switch, which stops the events after that point.
"""

from __future__ import annotations

import os

_APP_CHOSE = "ORT_DISABLE_TELEMETRY" in os.environ
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402 - after the variable, which onnxruntime latches

if not _APP_CHOSE:
    ort.disable_telemetry_events()

__all__ = ["ort"]
