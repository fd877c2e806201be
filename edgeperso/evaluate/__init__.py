"""Evaluate personalization: global vs personalized, per user, on a labelled data set.

    from edgeperso.evaluate import EvalConfig, LabelMap, evaluate
    report = evaluate("annotations.csv", "bundle/", EvalConfig(label_map=LabelMap("x>0")))
    report.summary["macro_f1"].gain_mean

The same as a command: `edgeperso evaluate DATA BUNDLE --out DIR` (see docs/evaluate.md).
"""

from edgeperso.evaluate._config import EvalConfig, LabelMap
from edgeperso.evaluate._data import read_table
from edgeperso.evaluate._evaluate import EvalProgress, evaluate
from edgeperso.evaluate._metrics import GainSummary, accuracy, bootstrap_ci, macro_f1, mae
from edgeperso.evaluate._plots import write_plots
from edgeperso.evaluate._report import ColdStartPoint, EvalReport, UserResult

__all__ = [
    "ColdStartPoint",
    "EvalConfig",
    "EvalProgress",
    "EvalReport",
    "GainSummary",
    "LabelMap",
    "UserResult",
    "accuracy",
    "bootstrap_ci",
    "evaluate",
    "macro_f1",
    "mae",
    "read_table",
    "write_plots",
]
