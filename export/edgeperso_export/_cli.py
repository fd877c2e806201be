"""`edgeperso-export`: a thin skin over export_bundle with a progress bar per stage."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgeperso import EdgePersoError
from edgeperso.bundle import MANIFEST, Manifest, sha256_file
from edgeperso_export._config import ExportConfig, ParityThresholds
from edgeperso_export._export import STAGES, export_bundle


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeperso-export",
        description="Export a Hugging Face encoder as a verified EdgePerso bundle.",
    )
    p.add_argument("model", help="local Hugging Face model directory (or a hub id when online)")
    p.add_argument("output", help="bundle directory to create")
    p.add_argument("--task", required=True, choices=["embedding", "classification", "regression"])
    p.add_argument("--labels", type=_csv, default=(), help="classification labels: a,b,c")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per text, at most the model's positions (default: the model's own, "
        "e.g. 256 for all-MiniLM-L6-v2)",
    )
    p.add_argument("--lora-r", type=int, default=8, help="rank of the user adapter")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--shared-r", type=int, default=4, help="rank of persona/global adapters")
    p.add_argument("--target-modules", type=_csv, default=None, help="e.g. query,value")
    p.add_argument(
        "--lora-layers", type=_ints, default=None, help="e.g. 3,4,5 (default: upper half)"
    )
    p.add_argument("--user-embedding-dim", type=int, default=32, help="0 disables it")
    p.add_argument("--seq-buckets", type=_ints, default=(32, 64, 128))
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--quantization-target", choices=["avx512_vnni", "avx2", "arm64"])
    p.add_argument("--min-cosine", type=float, default=ParityThresholds.min_cosine)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing bundle (or an empty folder); nothing else is replaced",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output; print only the digest"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = ExportConfig(
            task=args.task,
            labels=args.labels,
            max_length=args.max_length,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            shared_r=args.shared_r,
            lora_target_modules=args.target_modules,
            lora_layers=args.lora_layers,
            user_embedding_dim=args.user_embedding_dim,
            seq_buckets=args.seq_buckets,
            train_batch_size=args.train_batch_size,
            quantization_target=args.quantization_target,
            thresholds=ParityThresholds(min_cosine=args.min_cosine),
        )
        with _sigterm_exits():
            if args.quiet:
                manifest = export_bundle(args.model, args.output, config, overwrite=args.overwrite)
            else:
                manifest = _with_progress(args, config)
    except EdgePersoError as exc:
        print(f"edgeperso-export: error: {exc}", file=sys.stderr)
        return 2
    # The bundle's digest: manifest.json holds every other file's hash, so its own names all.
    digest = sha256_file(Path(args.output) / MANIFEST)
    if args.quiet:
        print(digest)  # the one line a build script reads: DIGEST=$(edgeperso-export ... -q)
        return 0
    for check in manifest.parity:
        mark = "ok " if check.passed else "!! "
        print(f"  {mark}{check.name:26s} {check.value:.6g}  (threshold {check.threshold})")
    print(f"bundle written to {args.output}")
    print(f"bundle sha256 {digest}  (pin it: Bundle.load(path, sha256=...))")
    return 0


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (CI cancel, `timeout`, `docker stop`) raises SystemExit, so the export removes
    its work folder as on Ctrl-C instead of dying with it on disk."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def exit_(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _with_progress(args: argparse.Namespace, config: ExportConfig) -> Manifest:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<18}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("starting", total=len(STAGES))

        def on_stage(name: str) -> None:
            done = STAGES.index(name)
            progress.update(task, description=name, completed=done)

        manifest = export_bundle(
            args.model, args.output, config, overwrite=args.overwrite, on_stage=on_stage
        )
        progress.update(task, description="done", completed=len(STAGES))
    return manifest


if __name__ == "__main__":
    raise SystemExit(main())
