"""What an evaluation run does: columns, label mapping, split, budgets (frozen, validated)."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable
from typing import Any, Literal

from edgeperso._errors import InvalidInputError
from edgeperso.runtime import TrainConfig

_COMPARE = re.compile(r"^\s*x\s*(>=|<=|==|!=|>|<)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """How a raw label value becomes a bundle label.

    "x>0" (any of > >= < <= == != and a number): a numeric column binarised to "yes"/"no".
    "Hateful=yes,Non-hateful=no": values renamed; a value not listed is an error.
    """

    spec: str

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise InvalidInputError("label map is empty: use e.g. 'x>0' or 'a=yes,b=no'")
        if _COMPARE.match(self.spec) is None and not self._pairs():
            raise InvalidInputError(
                f"label map {self.spec!r} is neither a comparison like 'x>0' nor a renaming "
                "like 'a=yes,b=no'"
            )

    def _pairs(self) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for part in self.spec.split(","):
            raw, sep, new = part.partition("=")
            if not sep or not raw.strip() or not new.strip() or raw.strip() in pairs:
                return {}
            pairs[raw.strip()] = new.strip()
        return pairs

    def apply(self, value: str) -> str:
        """The bundle label of one raw value; InvalidInputError when it cannot be mapped."""
        match = _COMPARE.match(self.spec)
        if match is None:
            pairs = self._pairs()
            if value.strip() not in pairs:
                raise InvalidInputError(
                    f"label value {value!r} is not listed in the label map {self.spec!r}"
                )
            return pairs[value.strip()]
        x = finite_number(value)
        if x is None:
            raise InvalidInputError(f"label map {self.spec!r} needs finite numbers, got {value!r}")
        return "yes" if _OPS[match.group(1)](x, float(match.group(2))) else "no"


def finite_number(text: str) -> float | None:
    """`text` as a finite float, or None ("nan" and "inf" parse, but are not labels)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: which columns to read, how to split each user's rows, how to train.

    The global head is a multinomial logistic regression (`head_steps` accelerated gradient
    steps; ridge regression for scores) on base-model features of every user's training
    rows. Its L2 strength and class weighting are picked from `head_l2` x
    `head_class_weighting` by `head_folds`-fold cross-validation over training users (a
    single value skips the choice). Each evaluated user is then personalized on device with
    `train`. `cold_start` lists the k (training
    rows per user) at which the personalization is repeated for the cold-start curve.

    With `global_epochs` > 0 the global level also trains: the bundle's global LoRA (B
    matrices) and head, through its train graph, for that many passes over every training
    row (`Personalizer.train_shared`), starting from the cross-validated head; the head is
    then cross-validated again on the trained model's features.

    `save_global` writes the global level the run fitted (or trained) to a file
    (`Personalizer.save_shared`), stamped with a digest of the training rows it saw;
    `global_params` loads such a file instead of fitting, so that one trained global level
    serves several evaluations of the personal level. A file stamped with other training
    rows (another data set, split, seed or test fraction) is refused: its test rows might
    not be held out.
    """

    user_column: str = "user"
    text_column: str = "text"
    label_column: str = "label"
    time_column: str | None = None  # required by split="time"
    label_map: LabelMap | None = None
    split: Literal["random", "time"] = "random"
    test_fraction: float = 0.3
    min_user_rows: int = 10  # users with fewer labelled rows are not evaluated
    max_users: int | None = None  # evaluate only the first N users (sorted by id)
    cold_start: tuple[int, ...] = (10, 25, 50)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    head_l2: tuple[float, ...] = (1e-3, 1e-2, 0.1, 0.3, 1.0)  # one value: no choice
    head_class_weighting: tuple[bool, ...] = (True, False)  # inverse-frequency weights or none
    head_steps: int = 500
    head_folds: int = 5
    global_epochs: float = 0.0  # 0: the global level is the linear head on base features
    global_learning_rate: float = 5e-4
    global_params: str | None = None  # load the global level from this file, fit nothing
    save_global: str | None = None  # write the fitted/trained global level to this file
    bootstrap: int = 2000
    seed: int = 0
    # Base features of the data set's texts, kept between runs on the same data and bundle.
    feature_cache: str | None = None

    def __post_init__(self) -> None:
        for name in ("user_column", "text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidInputError(f"EvalConfig.{name} must be a non-empty str")
        if self.split not in ("random", "time"):
            raise InvalidInputError("EvalConfig.split must be 'random' or 'time'")
        if self.split == "time" and not self.time_column:
            raise InvalidInputError("EvalConfig.split='time' needs a time_column")
        if self.label_map is not None and not isinstance(self.label_map, LabelMap):
            raise InvalidInputError("EvalConfig.label_map must be a LabelMap")
        if not isinstance(self.train, TrainConfig):
            raise InvalidInputError("EvalConfig.train must be a TrainConfig")
        _number(self.test_fraction, "test_fraction", low=0.0, high=1.0)
        _number(self.global_epochs, "global_epochs", low=0.0, inclusive=True)
        _number(self.global_learning_rate, "global_learning_rate", low=0.0)
        self._normalize_head_grid()
        for name, low in (
            ("min_user_rows", 4),
            ("head_steps", 1),
            ("head_folds", 2),
            ("bootstrap", 1),
        ):
            _int(getattr(self, name), name, low)
        _int(self.seed, "seed", 0)
        for name in ("feature_cache", "global_params", "save_global"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"EvalConfig.{name} must be a path (str) or None")
        if self.global_params is not None and self.global_epochs > 0:
            raise InvalidInputError(
                "EvalConfig.global_params loads a trained global level and global_epochs "
                "trains one: set one of them"
            )
        if self.max_users is not None:
            _int(self.max_users, "max_users", 1)
        object.__setattr__(self, "cold_start", tuple(sorted(set(self.cold_start))))
        for k in self.cold_start:
            _int(k, "cold_start entries", 4)

    def _normalize_head_grid(self) -> None:
        """One value or a non-empty sequence of them, stored as a tuple without repeats."""
        l2 = self.head_l2 if isinstance(self.head_l2, list | tuple) else (self.head_l2,)
        if not l2:
            raise InvalidInputError("EvalConfig.head_l2 needs at least one value")
        for value in l2:
            _number(value, "head_l2", low=0.0, inclusive=True)
        weighting = self.head_class_weighting
        weighting = weighting if isinstance(weighting, list | tuple) else (weighting,)
        if not weighting or not all(isinstance(v, bool) for v in weighting):
            raise InvalidInputError(
                "EvalConfig.head_class_weighting must be a bool or a non-empty tuple of bools"
            )
        object.__setattr__(self, "head_l2", tuple(dict.fromkeys(float(v) for v in l2)))
        object.__setattr__(self, "head_class_weighting", tuple(dict.fromkeys(weighting)))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label_map"] = None if self.label_map is None else self.label_map.spec
        return out


def _int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"EvalConfig.{name} must be an int >= {low}")


def _number(
    value: object, name: str, *, low: float, high: float = math.inf, inclusive: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low <= value if inclusive else low < value) and value < high  # type: ignore[operator]
    if not ok:
        raise InvalidInputError(f"EvalConfig.{name} is out of range")
