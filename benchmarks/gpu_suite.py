"""The GPU suite: one command for every figure that needs a CUDA device, in under 8 minutes on one GPU.

    python benchmarks/gpu_suite.py                            # on a CUDA machine: the full suite
    python benchmarks/gpu_suite.py --quick --device cpu       # the same code paths on a CPU, a few minutes
    python benchmarks/gpu_suite.py --smoke --device cpu       # smaller still (what tests/test_gpu_suite.py runs)

It writes ``benchmarks/results/gpu_suite.json`` (every figure) and ``gpu_suite.md`` (the tables, with the device
name, torch version and date; ``gpu_suite_cpu.*`` for a CPU run), after each section, so a run cut short keeps what
it has. Three sections:

1. ``cuda_tests``: the tests marked CUDA-only (a ``skipif`` on ``torch.cuda.is_available()``, found by reading
   ``tests/test_*.py``), run by pytest in a subprocess; passed / failed / skipped counts. On a CPU they are skipped.
2. ``optimizer_step``: ``bench_optimizer_step.py`` (its ``main``) on the layer shapes of LLaMA-130M, 350M and 1B, in
   float32 and bfloat16 weights and gradients: torch AdamW (foreach and fused), galore-torch's GaLoreAdamW and ours
   (svd, dct, svd with 8-bit moments). Step time, refresh time and state bytes; ratios to foreach AdamW.
3. ``training_memory``: real training steps through Lightning of ``examples/byte_lm.py``'s ``ByteLM`` with
   LLaMA-130M's shapes (``PRESETS["130M"]``: vocab 32000, hidden 768, intermediate 2048, 12 heads, 12 blocks) on
   random tokens, in ``precision="bf16-true"``: the module's torch AdamW against ``LowRankStrategy`` with the dct and
   svd projectors, svd with 8-bit moments (``state_bits=8``), svd with bf16 moments and P (``state_dtype``; by
   default a bf16 weight's projected state is float32) and svd layer-wise (``layerwise=True``). Each
   configuration trains in this process after the previous one is freed. Figures: the optimizer state (every tensor
   the optimizer holds, counted as ``peers.state_bytes`` does, and the memory report's count), parameters,
   gradients; on CUDA the peak allocated memory (``torch.cuda.max_memory_allocated``, with the peaks a
   ``MemoryPhases(every=1)`` callback read before its resets) and the per-phase peaks (forward, backward, optimizer
   step, batch end). On a CPU there are no CUDA counters: the peak figures are the memory report's byte counts
   (parameters + gradients + optimizer state, no activations) and the process's resident set size (its high-water
   mark reset at the start of training where Linux allows it), and the output says so.

Modes (``--quick``/``--smoke`` shrink every section; the CUDA default is the full one):

* full: optimizer step at 130M/350M/1B, 30 ordinary + 3 refresh steps timed; training: 12 blocks, batches of
  4 x 256 tokens, 10 steps, rank 256 (GaLore's for 130M).
* ``--quick``: optimizer step at 130M, 4 + 1 steps timed (on a CPU the bfloat16 table uses the ``tiny`` block,
  hidden 64: a CPU without bf16 matmul units runs a real block's bf16 step ~20x slower); training: 2 of the 12
  blocks, batches of 1 x 64 tokens, 3 steps.
* ``--smoke``: optimizer step on the ``tiny`` block only, 2 + 1 steps; training: the demo ``ByteLM`` (vocab 256,
  d_model 128) with 2 blocks, rank 16, batches of 2 x 32 tokens, 2 steps.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import bench_optimizer_step  # noqa: E402
import peers  # noqa: E402

RESULTS = HERE / "results"
MIB = 2**20
SECTIONS = ("cuda_tests", "optimizer_step", "training_memory")
STEP_OPTIMIZERS = ("adamw", "adamw-fused", "galore", "ours-svd", "ours-dct", "ours-svd-8bit")
# None: the module's own torch AdamW under Lightning's single-device strategy; a dict: LowRankStrategy's options.
TRAIN_CONFIGS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "lowrank-dct": {"projector": "dct", "dct_scorer": "fft"},
    "lowrank-svd": {"projector": "svd"},
    "lowrank-svd-8bit": {"projector": "svd", "state_bits": 8},
    # Moments and P of a bf16 weight are float32 by default; this keeps them in bf16, as AdamW's moments are.
    "lowrank-svd-bf16state": {"projector": "svd", "state_dtype": "bfloat16"},
    "lowrank-svd-layerwise": {"projector": "svd", "layerwise": True},
}
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "presets": ["130M", "350M", "1B"],
        "reps": 30,
        "refreshes": 3,
        "model": "130M",
        "blocks": None,
        "batch": 4,
        "seq": 256,
        "steps": 10,
        "rank": 256,
    },
    "quick": {
        "presets": ["130M"],
        "reps": 4,
        "refreshes": 1,
        "model": "130M",
        "blocks": 2,
        "batch": 1,
        "seq": 64,
        "steps": 3,
        "rank": 256,
    },
    "smoke": {
        "presets": ["tiny"],
        "reps": 2,
        "refreshes": 1,
        "model": "demo",
        "blocks": 2,
        "batch": 2,
        "seq": 32,
        "steps": 2,
        "rank": 16,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer presets, steps and blocks (a CPU: a few minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: what the test runs")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed", "32-true"])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help=f"where the JSON and Markdown go ({RESULTS})")
    parser.add_argument(
        "--name", help="file stem: NAME.json, NAME.md (default gpu_suite on CUDA, gpu_suite_cpu on a CPU)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a shared CPU")
    parser.add_argument("--test-timeout", type=int, default=300, help="seconds for the CUDA tests' pytest run")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --quick --device cpu for the CPU path)")
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.name = args.name or ("gpu_suite" if args.device == "cuda" else "gpu_suite_cpu")  # a CPU run is no GPU table
    return args


# -- 1. the CUDA-marked tests ----------------------------------------------------------------------------------------


def _mentions_cuda_skip(node: ast.expr) -> bool:
    """A ``pytest.mark.skipif(...)`` (called, or in a list of marks) whose condition mentions CUDA."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_mentions_cuda_skip(n) for n in node.elts)
    if not isinstance(node, ast.Call):
        return False
    return ast.unparse(node.func).endswith("skipif") and "cuda" in ast.unparse(node).lower()


def cuda_test_ids(tests_dir: Path = ROOT / "tests") -> list[str]:
    """pytest node ids of the tests skipped without CUDA: test functions and classes with such a ``skipif``
    decorator, and whole files with such a ``pytestmark``."""
    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(tests_dir.parent).as_posix()
        marked_file = any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and _mentions_cuda_skip(node.value)
            for node in tree.body
        )
        if marked_file:
            ids.append(rel)
            continue
        for node in tree.body:
            is_test = isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith("test")
            if is_test and any(_mentions_cuda_skip(d) for d in node.decorator_list):
                ids.append(f"{rel}::{node.name}")
    return ids


def run_cuda_tests(args: argparse.Namespace) -> dict[str, Any]:
    ids = cuda_test_ids()
    out: dict[str, Any] = {"node_ids": ids, "cuda_available": torch.cuda.is_available()}
    if not ids:
        return {**out, "status": "no CUDA-marked tests found", "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={xml}", *ids]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.test_timeout)
        except subprocess.TimeoutExpired:
            return {**out, "status": f"timed out after {args.test_timeout} s", "passed": 0, "failed": 0}
        out["seconds"] = time.perf_counter() - start
        out["returncode"] = proc.returncode
        out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        if not xml.exists():
            return {**out, "status": "pytest wrote no report", "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    out.update(
        status="ok" if proc.returncode in (0, 5) else "failures",
        total=counts["tests"],
        passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        failed=counts["failures"],
        errors=counts["errors"],
        skipped=counts["skipped"],
        failed_tests=failed,
    )
    return out


# -- 2. the optimizer-step table -------------------------------------------------------------------------------------


def step_presets(mode: dict[str, Any], dtype: str, device: str) -> list[str]:
    """A real block's bf16 step is ~20x slower on a CPU than in fp32 (no bf16 matmul units): the quick CPU run
    takes the tiny block for bf16 instead."""
    if device == "cpu" and dtype == "bfloat16" and mode is MODES["quick"]:
        return ["tiny"]
    return mode["presets"]


def run_optimizer_step(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    mode = MODES[args.mode]
    out: dict[str, Any] = {"optimizers": list(STEP_OPTIMIZERS), "tables": {}}
    for dtype in ("float32", "bfloat16"):
        argv = ["--device", args.device, "--dtype", dtype, "--presets", *step_presets(mode, dtype, args.device)]
        argv += ["--reps", str(mode["reps"]), "--refreshes", str(mode["refreshes"])]
        argv += ["--only", *STEP_OPTIMIZERS, "--json", str(tmp / f"step_{dtype}.json")]
        print(f"[optimizer_step] bench_optimizer_step.py {' '.join(argv)}", flush=True)
        result = bench_optimizer_step.main(argv)
        out["tables"][dtype] = {"argv": argv, "config": result["config"], "presets": result["presets"]}
    return out


# -- 3. the memory of real training steps ----------------------------------------------------------------------------


class Measure:
    """A Lightning callback (made a subclass of ``L.Callback`` in ``training_callback``): the figures of one run."""

    def __init__(self, phases: Any) -> None:
        self.phases = phases
        self.figures: dict[str, Any] = {}
        self.grad_bytes = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from bench_fsdp2_memory import current_rss, reset_peak_rss

        self.device = pl_module.device
        self.peak_reset = reset_peak_rss()
        self.start_rss = current_rss()
        self.start_allocated = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        self.start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in pl_module.parameters() if p.grad is not None)
        self.grad_bytes = max(self.grad_bytes, grads)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        from bench_fsdp2_memory import current_rss

        from lightning_lowrank import account_memory
        from lightning_lowrank.memory.accounting import max_rss_bytes

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        (opt,) = trainer.optimizers
        strategy = trainer.strategy
        if hasattr(strategy, "memory_report"):
            report = strategy.memory_report()
        else:  # the dense run: the same accounting over the module's own optimizer
            params = list(pl_module.parameters())
            report = account_memory([opt], params, {}, self.device, module=pl_module, phases=self.phases.phase_stats())
        peak_rss = max_rss_bytes()
        fig: dict[str, Any] = {
            "optimizer": type(opt).__name__,
            "steps": trainer.global_step,
            "seconds": seconds,
            "seconds_per_step": seconds / max(1, trainer.global_step),
            "state_bytes": peers.state_bytes(opt),
            "report_state_bytes": report.optimizer_state_bytes,
            "report_baseline_state_bytes": report.baseline_state_bytes,
            "state_by_kind": report.state_by_kind,
            "param_bytes": report.param_bytes,
            # The larger of: the gradients held before the optimizer step, and the report's count (layer-wise: the
            # largest single gradient, each freed inside backward right after its update).
            "grad_bytes": max(self.grad_bytes, report.grad_bytes),
            "grad_bytes_before_step": self.grad_bytes,
            "report_grad_bytes": report.grad_bytes,
            "projected_layers": len(report.layers),
            "live_bytes": report.param_bytes + max(self.grad_bytes, report.grad_bytes) + report.optimizer_state_bytes,
            "report_agrees": peers.state_bytes(opt) == report.optimizer_state_bytes,
            "start_rss_bytes": self.start_rss,
            "max_rss_bytes": peak_rss,
            "rss_growth_bytes": peak_rss - self.start_rss,
            "rss_now_bytes": current_rss(),
            "peak_reset": self.peak_reset,
        }
        if self.device.type == "cuda":
            run_peak = self.phases.run_peak_allocated_bytes() or 0
            fig["start_allocated_bytes"] = self.start_allocated
            fig["peak_allocated_bytes"] = max(torch.cuda.max_memory_allocated(self.device), run_peak)
            fig["report_peak_allocated_bytes"] = report.peak_allocated_bytes
            fig["phases"] = self.phases.phase_stats()
        self.figures = fig


def training_callback(phases: Any) -> Any:
    import lightning as L

    cls = type("MeasureCallback", (Measure, L.Callback), {})
    return cls(phases)


def train_once(name: str, options: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    from bench_fsdp2_memory import model_config
    from byte_lm import ByteLM
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lowrank import LowRankStrategy, MemoryPhases

    mode = MODES[args.mode]
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    cfg = model_config(mode["model"], mode["blocks"], mode["seq"])
    torch.manual_seed(0)
    model = ByteLM(cfg, max_steps=mode["steps"], warmup_steps=1)
    numel = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (mode["steps"] * mode["batch"], mode["seq"] + 1), generator=gen)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=mode["batch"])
    if options is None:
        strategy: Any = "auto"
    else:
        strategy = LowRankStrategy(device=device, rank=mode["rank"], memory_report=False, memory_json=False, **options)
    phases = MemoryPhases(every=1)
    measure = training_callback(phases)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=strategy,
        precision=args.precision,
        max_steps=mode["steps"],
        limit_val_batches=0,
        logger=False,
        callbacks=[phases, measure],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=data)
    figures = {"config": name, "options": options, "numel": numel, "allocated_before_bytes": before, **measure.figures}
    del trainer, model, measure, phases, strategy, data
    gc.collect()
    return figures


def run_training_memory(args: argparse.Namespace) -> dict[str, Any]:
    mode = MODES[args.mode]
    cuda = args.device == "cuda"
    out: dict[str, Any] = {
        "model": "ByteLM with LLaMA-130M shapes" if mode["model"] == "130M" else "ByteLM demo shapes (d_model 128)",
        "blocks": mode["blocks"] or 12,
        "batch": mode["batch"],
        "seq": mode["seq"],
        "steps": mode["steps"],
        "rank": mode["rank"],
        "precision": args.precision,
        "peak_source": (
            "torch.cuda.max_memory_allocated and MemoryPhases(every=1) per-phase peaks"
            if cuda
            else "CPU: no CUDA counters; the memory report's byte counts (parameters + largest gradients + optimizer "
            "state, no activations) and the process's resident set size"
        ),
        "configs": {},
    }
    for name, options in TRAIN_CONFIGS.items():
        print(f"[training_memory] {name}: {options or 'torch AdamW, Lightning single-device strategy'}", flush=True)
        try:
            out["configs"][name] = train_once(name, options, args)
        except Exception as err:  # one configuration failing must not lose the others
            out["configs"][name] = {"config": name, "options": options, "error": f"{type(err).__name__}: {err}"}
    adamw = out["configs"].get("adamw", {})
    for row in out["configs"].values():
        if "error" not in row and "error" not in adamw:
            row["state_ratio"] = row["state_bytes"] / adamw["state_bytes"]
            if cuda:
                row["peak_ratio"] = row["peak_allocated_bytes"] / adamw["peak_allocated_bytes"]
    return out


# -- output ----------------------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:.1f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cuda = result["device"] == "cuda"
    lines = [
        "# GPU suite",
        "",
        f"- Command: `{result['command']}` (mode {result['mode']})",
        f"- Device: {m['device']}; torch {m['torch']}; {m['platform']}; {m['cpu_count']} CPUs",
        f"- Date: {m['date']}; code: {m['git']}",
        f"- Seconds per section: {', '.join(f'{k} {v:.0f}' for k, v in result['seconds'].items())}",
    ]
    if not cuda:
        lines.append(
            "- **CPU run**: the CUDA tests are skipped and there are no CUDA peaks; the training peaks below are the "
            "memory report's byte counts and the process's RSS. A smoke result, not the GPU figures."
        )
    tests = result.get("cuda_tests")
    if tests is not None:
        lines += ["", "## 1. CUDA-marked tests", ""]
        if "error" in tests:
            lines.append(f"failed to run: {tests['error']}")
        else:
            lines.append(
                f"{len(tests['node_ids'])} marked test functions ({', '.join(f'`{i}`' for i in tests['node_ids'])}): "
                f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, "
                f"{tests.get('skipped', 0)} skipped ({tests['status']})."
            )
            lines += [f"- failed: `{t}`" for t in tests.get("failed_tests", [])]
    step = result.get("optimizer_step")
    if step is not None:
        lines += ["", "## 2. Optimizer step on LLaMA layer shapes", ""]
        if "error" in step:
            lines.append(f"failed to run: {step['error']}")
        for table in step.get("tables", {}).values():
            for preset in table["presets"].values():
                lines += [f"{preset['title']}", ""]
                lines += [
                    "| optimizer | state MiB | x AdamW | step ms | x AdamW | refresh ms | amortised@200 ms | x AdamW |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|",
                ]
                for r in preset["rows"]:
                    if r["status"] != "ok":
                        lines.append(f"| {r['name']} | not run: {r['reason']} | | | | | | |")
                        continue
                    refresh = "-" if r["refresh_ms"] is None else f"{r['refresh_ms']:.2f}"
                    lines.append(
                        f"| {r['name']} | {r['state_bytes'] / MIB:.2f} | {r.get('state_ratio', float('nan')):.3f} | "
                        f"{r['step_ms']:.3f} | {r.get('step_ratio', float('nan')):.2f} | {refresh} | "
                        f"{r['amortised_ms']:.3f} | {r.get('amortised_ratio', float('nan')):.2f} |"
                    )
                lines.append("")
    train = result.get("training_memory")
    if train is not None:
        lines += ["## 3. Memory of real training steps", ""]
        if "error" in train:
            lines.append(f"failed to run: {train['error']}")
        else:
            lines += [
                f"{train['model']}, {train['blocks']} blocks, batches of {train['batch']} x {train['seq']} tokens, "
                f"{train['steps']} steps, rank {train['rank']}, precision {train['precision']}. Peaks: "
                f"{train['peak_source']}.",
                "",
            ]
            if cuda:
                head = "| config | state MiB | x AdamW | params MiB | grads MiB | peak allocated MiB | x AdamW "
                head += "| forward | backward | optimizer step | batch end | s/step |"
                lines += [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            else:
                head = "| config | state MiB | x AdamW | params MiB | grads MiB | params+grads+state MiB "
                head += "| max RSS MiB | RSS growth MiB | s/step |"
                lines += [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name, r in train["configs"].items():
                if "error" in r:
                    lines.append(f"| {name} | failed: {r['error']} |")
                    continue
                cells = [
                    name,
                    mib(r["state_bytes"]),
                    f"{r.get('state_ratio', float('nan')):.3f}",
                    mib(r["param_bytes"]),
                    mib(r["grad_bytes"]),
                ]
                if cuda:
                    ph = r.get("phases") or {}
                    cells += [mib(r["peak_allocated_bytes"]), f"{r.get('peak_ratio', float('nan')):.3f}"]
                    cells += [mib(ph.get(k)) for k in ("forward", "backward", "optimizer_step", "batch_end")]
                else:
                    cells += [mib(r["live_bytes"]), mib(r["max_rss_bytes"]), mib(r["rss_growth_bytes"])]
                cells.append(f"{r['seconds_per_step']:.2f}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": args.mode,
        "device": args.device,
        "machine": peers.machine_info(bench_optimizer_step.PEER_PACKAGES, device),
        "settings": MODES[args.mode],
        "seconds": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.md"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            t0 = time.perf_counter()
            print(f"== {section}", flush=True)
            try:
                if section == "cuda_tests":
                    result[section] = run_cuda_tests(args)
                elif section == "optimizer_step":
                    result[section] = run_optimizer_step(args, Path(tmp))
                else:
                    result[section] = run_training_memory(args)
            except Exception as err:  # keep the other sections
                result[section] = {"error": f"{type(err).__name__}: {err}"}
            result["seconds"][section] = time.perf_counter() - t0
            json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
            md_path.write_text(markdown(result))
    result["seconds"]["total"] = time.perf_counter() - start
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {json_path} and {md_path} in {result['seconds']['total']:.0f} s")
    return result


if __name__ == "__main__":
    main()
