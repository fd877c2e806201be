import pytest

pytest.importorskip("torch", reason="the export toolchain needs torch (make test installs it)")
