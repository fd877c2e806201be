"""The `edgeperso` command: a thin skin over the public API.

edgeperso evaluate annotations.csv bundle/ --label-column anger --label-map "x>0"
edgeperso train profile.db bundle/ alice --passphrase-env EDGEPERSO_PASSPHRASE
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeperso._atomic import write_atomically
from edgeperso._errors import CancelledError, EdgePersoError, InvalidInputError, UnsupportedError

USAGE_ERROR = 2  # argparse's exit status for a bad command line; typed errors use it too


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.run(args)
    except EdgePersoError as exc:
        print(f"edgeperso {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"edgeperso {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeperso", description="EdgePerso tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser(
        "evaluate",
        help="global vs personalized, per user, on a labelled data set",
        description="Split each user's rows, fit the bundle's global head on the training "
        "rows, personalize every user on device and report per-user gains (JSON + PNG).",
    )
    ev.add_argument("data", type=Path, help=".csv, .tsv or .jsonl with user, text, label")
    ev.add_argument("bundle", type=Path, help="an exported classification/regression bundle")
    ev.add_argument("--out", type=Path, default=Path("edgeperso-eval"), help="output folder")
    ev.add_argument("--texts", type=Path, help="a second table holding the texts, joined in")
    ev.add_argument("--join-on", default="text_id", help="column shared with --texts")
    ev.add_argument("--user-column", default="user")
    ev.add_argument("--text-column", default="text")
    ev.add_argument("--label-column", default="label")
    ev.add_argument("--time-column", help="split by time: each user's latest rows are tested")
    ev.add_argument("--label-map", help="'x>0' (numbers -> yes/no) or 'a=yes,b=no'")
    ev.add_argument("--test-fraction", type=float, default=0.3)
    ev.add_argument("--min-user-rows", type=int, default=10)
    ev.add_argument("--max-users", type=int, help="evaluate only the first N users")
    ev.add_argument("--cold-start", default="10,25,50", help="k values, e.g. 10,25,50 ('' to skip)")
    ev.add_argument("--epochs", type=int, default=10, help="on-device training epochs")
    ev.add_argument("--max-seconds", type=float, default=60.0, help="training budget per user")
    ev.add_argument("--learning-rate", type=float, default=1e-2)
    ev.add_argument(
        "--adapter",
        action="store_true",
        help="after the head, train LoRA + user embedding with the train graph (slower)",
    )
    ev.add_argument(
        "--no-adapter", dest="adapter", action="store_false", help="the head only (default)"
    )
    ev.add_argument(
        "--feature-cache",
        type=Path,
        help="an .npz file keeping the global head's base features between runs on the same "
        "data and bundle (it holds embeddings of the data set's texts: evaluation data only)",
    )
    ev.add_argument(
        "--global-l2",
        default="0.001,0.01,0.1,0.3,1",
        help="L2 strengths for the global head, chosen by cross-validation over users",
    )
    ev.add_argument(
        "--global-class-weighting",
        choices=("cv", "on", "off"),
        default="cv",
        help="inverse-frequency class weights for the global head: chosen by CV, or fixed",
    )
    ev.add_argument(
        "--global-epochs",
        type=float,
        default=0.0,
        help="also train the global LoRA and head on the training rows for this many "
        "passes through the bundle's train graph (default 0: the linear head only)",
    )
    ev.add_argument("--global-learning-rate", type=float, default=5e-4)
    ev.add_argument(
        "--save-global",
        type=Path,
        help="write the fitted (or trained) global level to this .safetensors file",
    )
    ev.add_argument(
        "--global-params",
        type=Path,
        help="load the global level from a file --save-global wrote on the same data, "
        "split and bundle, instead of fitting it (not with --global-epochs)",
    )
    ev.add_argument(
        "--head-l2",
        help="strengths of the user's head pull toward the shared model, cross-validated per "
        "user, e.g. 0.01,0.1,1,10 (one value: no choice; default: TrainConfig's)",
    )
    ev.add_argument(
        "--knn-k",
        help="neighbour counts of the retrieval candidates in on-device training, e.g. 5,15 "
        "('' offers none; default: TrainConfig's)",
    )
    ev.add_argument(
        "--selection-se",
        type=float,
        help="standard errors by which a user's candidate must beat the shared model to be "
        "kept: higher keeps fewer users' personal models, and makes fewer worse (default: "
        "TrainConfig's)",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--no-plots", action="store_true", help="write the JSON only")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    ev.set_defaults(run=_evaluate)
    _add_train(commands)
    return parser


def _add_train(commands: Any) -> None:
    tr = commands.add_parser(
        "train",
        help="train one user of an existing encrypted store on their stored examples",
        description="Open an existing store, train USER on their stored examples with the "
        "bundle's runtime (the same call an app makes), and print what was kept. Ctrl-C "
        "stops at the next step and keeps the best parameters found so far; the next run "
        "with the same settings goes on from the checkpoint.",
    )
    tr.add_argument("store", type=Path, help="the store's database file (never created here)")
    tr.add_argument("bundle", type=Path, help="the exported bundle the app serves")
    tr.add_argument("user", help="the user id the app stores examples under")
    # Secrets never travel on the command line, where other processes can read them.
    key = tr.add_mutually_exclusive_group(required=True)
    key.add_argument("--passphrase-env", metavar="VAR", help="the passphrase is in $VAR")
    key.add_argument("--key-env", metavar="VAR", help="$VAR holds the raw 32-byte key, hex")
    key.add_argument(
        "--keyring", nargs=2, metavar=("SERVICE", "PROFILE"), help="the OS keystore entry"
    )
    tr.add_argument(
        "--counter-keyring",
        nargs=2,
        metavar=("SERVICE", "PROFILE"),
        help="the store's rollback counter is in the OS keystore (default: the sidecar file)",
    )
    tr.add_argument("--max-seconds", type=float, default=60.0)
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--adapter", action="store_true", help="also train the LoRA adapter stage")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(run=_train)


def _key_from(args: argparse.Namespace) -> Any:
    from edgeperso.store import KeyringKey, PassphraseKey, RawKey

    if args.keyring:
        return KeyringKey(*args.keyring)
    var = args.passphrase_env or args.key_env
    secret = os.environ.get(var, "")
    if not secret:
        raise InvalidInputError(f"${var} is not set or empty: export the secret there first")
    if args.passphrase_env:
        return PassphraseKey(secret)
    try:
        return RawKey(bytes.fromhex(secret.strip()))
    except ValueError:
        raise InvalidInputError(f"${var} must hold 64 hex digits (a 32-byte key)") from None


def _train(args: argparse.Namespace) -> int:
    cancelled = False

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal cancelled
        if cancelled:  # a second Ctrl-C: stop now (the store's writes are atomic)
            raise KeyboardInterrupt
        cancelled = True  # train() stops at the next example or step

    # Installed first, so that a Ctrl-C while the store and bundle open cancels too.
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        from edgeperso.runtime import Personalizer, TrainConfig
        from edgeperso.store import KeyringCounter, SidecarCounter, Store, StoreConfig

        counter = (
            KeyringCounter(*args.counter_keyring) if args.counter_keyring else SidecarCounter()
        )
        config = TrainConfig(
            max_seconds=args.max_seconds,
            max_steps=args.max_steps,
            epochs=args.epochs,
            adapter=args.adapter,
        )
        store_config = StoreConfig(create=False, rollback_counter=counter)
        with Store.open(args.store, _key_from(args), store_config) as store:
            model = Personalizer.open(args.bundle, store)
            # one bar over the adapter stage's steps (the head stage takes under a second)
            with _progress(args.quiet) as advance:
                on_progress = (
                    None
                    if advance is None
                    else (lambda p: advance("adapter steps", p.step, p.total_steps))
                )
                try:
                    result = model.train(
                        args.user, config, on_progress=on_progress, cancel=lambda: cancelled
                    )
                except CancelledError:
                    print(
                        f"user {args.user}: cancelled before anything was stored; the stored "
                        "adapter is unchanged"
                    )
                    return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    print(
        f"user {args.user}: kept {result.kept} (stage {result.stage}); {result.reason}\n"
        f"{result.metric} held out: shared {_f(result.global_score)}, "
        f"personal {_f(result.personal_score)}; {result.examples} examples, "
        f"{result.steps} steps, {_f(result.seconds, 1)} s, {result.stopped}"
        + (f"; resumed from step {result.resumed_from_step}" if result.resumed_from_step else "")
        + (f"; {result.truncated_texts} texts truncated" if result.truncated_texts else "")
    )
    return 0


def _listed(text: str, kind: Callable[[str], Any], message: str) -> tuple[Any, ...]:
    """A comma-separated option as a tuple ('' gives an empty one; spaces are ignored)."""
    try:
        return tuple(kind(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InvalidInputError(message) from None


def _evaluate(args: argparse.Namespace) -> int:
    from edgeperso.evaluate import EvalConfig, LabelMap, evaluate, read_table, write_plots
    from edgeperso.evaluate._paths import output_folder
    from edgeperso.runtime import TrainConfig

    ks = _listed(args.cold_start, int, "--cold-start takes integers, e.g. 10,25,50")
    l2 = _listed(args.global_l2, float, "--global-l2 takes numbers, e.g. 0.01,0.1,1")
    overrides: dict[str, Any] = {}
    if args.knn_k is not None:
        overrides["knn_k"] = _listed(
            args.knn_k, int, "--knn-k takes integers, e.g. 5,15 ('' for none)"
        )
    if args.head_l2 is not None:
        overrides["head_l2"] = _listed(
            args.head_l2, float, "--head-l2 takes numbers, e.g. 0.1,1,10"
        )
    if args.selection_se is not None:
        overrides["selection_se"] = args.selection_se
    weighting = {"cv": (True, False), "on": (True,), "off": (False,)}
    config = EvalConfig(
        user_column=args.user_column,
        text_column=args.text_column,
        label_column=args.label_column,
        time_column=args.time_column,
        label_map=LabelMap(args.label_map) if args.label_map else None,
        split="time" if args.time_column else "random",
        test_fraction=args.test_fraction,
        min_user_rows=args.min_user_rows,
        max_users=args.max_users,
        cold_start=ks,
        train=TrainConfig(
            epochs=args.epochs,
            max_seconds=args.max_seconds,
            learning_rate=args.learning_rate,
            adapter=args.adapter,
            seed=args.seed,
            **overrides,
        ),
        head_l2=l2,
        head_class_weighting=weighting[args.global_class_weighting],
        global_epochs=args.global_epochs,
        global_learning_rate=args.global_learning_rate,
        seed=args.seed,
        feature_cache=str(args.feature_cache) if args.feature_cache else None,
        global_params=str(args.global_params) if args.global_params else None,
        save_global=str(args.save_global) if args.save_global else None,
    )
    rows = read_table(args.data, texts=args.texts, join_on=args.join_on)
    output_folder(args.out, "--out")  # now, not after the run
    with _progress(args.quiet) as advance:
        on_progress = None if advance is None else (lambda e: advance(e.stage, e.done, e.total))
        report = evaluate(rows, args.bundle, config, on_progress=on_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    # Whole or not at all, and owner-only (mkstemp's 0600): the report lists the data's user ids.
    text = json.dumps(report.to_json(), indent=2) + "\n"
    write_atomically(args.out / "report.json", lambda out: out.write(text.encode("utf-8")))
    written = [args.out / "report.json"]
    if not args.no_plots:
        try:
            written += write_plots(report, args.out)
        except UnsupportedError as exc:
            print(f"edgeperso evaluate: plots skipped: {exc}", file=sys.stderr)
    if not args.quiet:
        _print_summary(report.to_json(), written)
    return 0


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """advance(stage, done, total) drawing one rich bar per stage; None when quiet or
    when rich is not installed."""
    try:
        from rich.progress import Progress
    except ImportError:
        yield None
        return
    if quiet:
        yield None
        return
    with Progress(transient=True) as bar:
        tasks: dict[str, Any] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield advance


def _print_summary(report: dict[str, Any], written: list[Path]) -> None:
    metric = report["primary_metric"]
    data, timing = report["data"], report["timing"]
    lines = [
        f"{data['evaluated_users']} users evaluated ({len(data['skipped_users'])} skipped), "
        f"task {report['task']}",
    ]
    for name, s in report["summary"].items():
        low, high = s["gain_ci95"]
        lines.append(
            f"{name}: global {_f(s['global_mean'])} -> personalized {_f(s['personal_mean'])}"
            f"  gain {_f(s['gain_mean'])} [95% CI {_f(low)}, {_f(high)}]"
            f"  median gain {_f(s['gain_median'])}  worse {_pct(s['share_worse'])}"
            f"  worst decile {_f(s['worst_decile_mean_gain'])}"
        )
    for c in report["cold_start"]:
        k = "all" if c["k"] is None else c["k"]
        lines.append(
            f"cold start k={k}: {c['users']} users, {metric} gain {_f(c['gain_mean'])}, "
            f"worse {_pct(c['share_worse'])}, kept personal {_pct(c['share_kept_personal'])}"
        )
    lines.append(
        f"training {_f(timing['train_seconds_per_user_mean'], 1)} s/user (median "
        f"{_f(timing['train_seconds_per_user_median'], 1)}), adapter "
        f"{_f(timing['adapter_bytes_mean'], 0)} bytes, total {_f(timing['total_seconds'], 0)} s"
        f" on {report['machine']['cpu']}"
    )
    lines += [f"wrote {p}" for p in written]
    print("\n".join(lines))


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


if __name__ == "__main__":
    sys.exit(main())
