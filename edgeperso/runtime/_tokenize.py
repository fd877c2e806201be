"""Text -> padded token ids, with truncation reported rather than silent."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgeperso._errors import BundleIntegrityError, InvalidInputError
from edgeperso.store._codec import check_unicode


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # [batch, seq] int64
    attention_mask: np.ndarray  # [batch, seq] int64
    truncated: tuple[bool, ...]  # per text: longer than max_length, cut to it


class TextEncoder:
    def __init__(self, path: Path, max_length: int) -> None:
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
            raise BundleIntegrityError(
                f"the bundle's tokenizer {path.name!r} cannot be read ({exc}); re-export the bundle"
            ) from exc
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.max_length = max_length

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> Encoded:
        check_texts(texts)
        encodings = self._tok.encode_batch(list(texts))
        width = pad_to or max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for row, enc in enumerate(encodings):
            n = min(len(enc.ids), width)
            ids[row, :n] = enc.ids[:n]
            mask[row, :n] = 1
        truncated = tuple(bool(e.overflowing) for e in encodings)
        return Encoded(ids, mask, truncated)


def check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidInputError("texts must be a str or a sequence of str")
    if not texts:
        raise InvalidInputError("texts is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{i}] is {type(text).__name__}, not str")
        if not text.strip():
            raise InvalidInputError(f"texts[{i}] is empty or whitespace only")
        check_unicode(text, f"texts[{i}]")
