"""The one place where onnxruntime sessions are created and fed.

One inference session serves every user: a user's adapter travels in the feeds of each run,
so it never touches disk in plaintext and no session holds user state between runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeperso._errors import BundleIntegrityError, InvalidInputError
from edgeperso._onnxruntime import ort

Feeds = Mapping[str, np.ndarray]
Shape = tuple[int | None, ...]  # None: a dimension that is not checked (batch, sequence)


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """Passed through to onnxruntime. `None` keeps onnxruntime's own default."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.providers, str) or not isinstance(self.providers, Sequence):
            raise InvalidInputError(
                "providers must be a sequence of provider names, e.g. ('CPUExecutionProvider',)"
            )
        if not self.providers:
            raise InvalidInputError("providers must name at least one execution provider")
        unknown = [p for p in self.providers if p not in ort.get_available_providers()]
        if unknown:
            raise InvalidInputError(
                f"execution providers {unknown} are not available in this onnxruntime build; "
                f"available: {ort.get_available_providers()}"
            )
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024
            ):
                raise InvalidInputError(f"{name} must be an int in 1..1024 or None")


class Graph:
    """An onnxruntime session over one verified bundle graph."""

    def __init__(self, path: Path, options: SessionOptions) -> None:
        so = ort.SessionOptions()
        # Slots are initializers that are also inputs; onnxruntime warns about each of them.
        so.log_severity_level = 3
        if options.intra_op_threads is not None:
            so.intra_op_num_threads = options.intra_op_threads
        if options.inter_op_threads is not None:
            so.inter_op_num_threads = options.inter_op_threads
        self._session = ort.InferenceSession(str(path), so, providers=list(options.providers))
        # Overridable initializers (slots, head, history) are not in get_inputs().
        overridable = self._session.get_overridable_initializers()
        self.inputs = frozenset(i.name for i in [*self._session.get_inputs(), *overridable])
        self.outputs = tuple(o.name for o in self._session.get_outputs())
        self.path = path
        self._shapes = {
            node.name: tuple(d if isinstance(d, int) else None for d in node.shape)
            for node in [*self._session.get_inputs(), *overridable, *self._session.get_outputs()]
        }

    def expect(self, shapes: Mapping[str, Shape]) -> None:
        """Check that the graph has these inputs/outputs with these static dimensions.

        The manifest says what the graphs take; a manifest edited after export (it is the
        one file no hash in it covers) or a graph from another export would otherwise fail
        inside onnxruntime at the first prediction, or silently read the wrong outputs.
        """
        wrong = []
        for name, want in shapes.items():
            have = self._shapes.get(name)
            if have is None:
                wrong.append(f"{name} is missing")
            elif len(have) != len(want) or any(
                h is not None and w is not None and h != w for h, w in zip(have, want, strict=True)
            ):
                wrong.append(
                    f"{name} is {_shape(have)} in the graph, {_shape(want)} in the manifest"
                )
        if wrong:
            raise BundleIntegrityError(
                f"{self.path.name} does not match the bundle manifest: {'; '.join(wrong[:3])}"
                f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}; re-export "
                "the bundle"
            )

    def run(self, outputs: Sequence[str], feeds: Feeds) -> list[np.ndarray]:
        fed = {k: v for k, v in feeds.items() if k in self.inputs}
        return list(self._session.run(list(outputs), fed))


def _shape(shape: Shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
