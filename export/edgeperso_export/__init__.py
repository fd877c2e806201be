"""EdgePerso export: a Hugging Face encoder becomes a verified on-device bundle.

from edgeperso_export import ExportConfig, export_bundle
export_bundle("path/to/model", "bundle/", ExportConfig(task="classification",
                                                       labels=("neg", "pos")))
"""

# First: onnxruntime (also under optimum) must start with its telemetry off (see there).
import edgeperso._onnxruntime  # noqa: F401
from edgeperso_export._config import ExportConfig, ParityThresholds
from edgeperso_export._errors import ExportError, ParityError
from edgeperso_export._export import export_bundle

__all__ = ["ExportConfig", "ExportError", "ParityError", "ParityThresholds", "export_bundle"]
