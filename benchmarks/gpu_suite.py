"""The GPU suite: one command for every figure that needs a CUDA device, sized for a short lease of one GPU.

    python benchmarks/gpu_suite.py                            # on a CUDA machine: a quick pass, then the full suite
    python benchmarks/gpu_suite.py --quick                    # the quick pass alone (estimated < 3 min on an H100)
    python benchmarks/gpu_suite.py --quick --device cpu       # the same code paths on a CPU, a few minutes
    python benchmarks/gpu_suite.py --smoke --device cpu       # smaller still (tests/integration/test_gpu_suite.py)

It writes ``benchmarks/results/gpu_suite.json`` (every figure) and ``gpu_suite.md`` (the tables, with the device
name, torch version and date; ``gpu_suite_cpu.*`` for a CPU run) into ``--out-dir`` after every table, row and
configuration (each file replaced whole, never half-written), so a run killed by a time limit keeps everything that
finished; a section cut short says so. The full CUDA run first makes the quick pass (``gpu_suite_quick.*``), so the
first results are on disk after a few minutes even when the lease ends during the full pass (``--no-quick-first``
skips it). Four sections, each printing its elapsed time:

1. ``cuda_tests``: the tests marked CUDA-only (a ``skipif`` on ``torch.cuda.is_available()``, found by reading
   ``tests/test_*.py``), run by pytest in a subprocess; passed / failed / skipped counts. On a CPU they are skipped.
2. ``sync_check``: every optimizer configuration worth checking for host syncs (``SYNC_ROWS``: each projector,
   ``fused=True``, ``projector_bits`` 8 and 4, each residual, 8-bit state, SGD, a resume, layer-wise mode alone
   and under DDP in a world of one process) on one LLaMA block's weights in bfloat16. Each row warms up (its first
   step refreshes the subspace), then takes a few steady steps (no refresh) under
   ``torch.cuda.set_sync_debug_mode("error")``: the first synchronizing operation raises, and the row records its
   message and where in ``lightning_lowrank`` it came from; the same steps then run again in ``"warn"`` mode to
   count every sync per step and where each came from. The other rows go on. Then a few timed steps. The rows run
   with ``nonfinite="ignore"``, since the default check reads one flag per step by design; the ``*-nonfinite-skip``
   rows keep it, and expect that one read (as ``layerwise-ddp`` expects its rank-agreement read). On a CPU there is
   no sync debug mode: the rows run and are timed, the check is skipped, and the output says so.
3. ``optimizer_step``: ``bench_optimizer_step.py`` (its ``main``, once per preset and dtype, each preset's JSON
   into ``--out-dir``) on the layer shapes of LLaMA-130M, 350M and 1B, in float32 and bfloat16 weights and
   gradients: torch AdamW (foreach and fused), galore-torch's GaLoreAdamW and ours (svd, dct, svd with 8-bit
   moments). Step time, refresh time and state bytes; ratios to foreach AdamW.
4. ``training_memory``: real training steps through Lightning of ``examples/byte_lm.py``'s ``ByteLM`` with
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

* full: sync check on the LLaMA-1B block (the quick pass did 130M), 10 steps timed; optimizer step at
  130M/350M/1B, 30 ordinary + 3 refresh steps timed; training: 12 blocks, batches of 4 x 256 tokens, 10 steps,
  rank 256 (GaLore's for 130M).
* ``--quick``: sync check on the 130M block, 3 steps checked and 3 timed; optimizer step at 130M, 4 + 1 steps
  timed; training: 2 of the 12 blocks, batches of 1 x 64 tokens, 3 steps. On a CPU the bfloat16 step table and the
  sync rows use the ``tiny`` block, hidden 64 (a CPU without bf16 matmul units runs a real block's bf16 step ~20x
  slower).
* ``--smoke``: the ``tiny`` block only, 2 + 1 steps; sync rows 2 steps checked and 2 timed; training: the demo
  ``ByteLM`` (vocab 256, d_model 128) with 2 blocks, rank 16, batches of 2 x 32 tokens, 2 steps.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
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
PACKAGE = ROOT / "lightning_lowrank"
MIB = 2**20
SECTIONS = ("cuda_tests", "sync_check", "optimizer_step", "training_memory")
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
# The sync check's rows. Keys the harness reads (SYNC_HARNESS_KEYS): ``torch`` (plain torch AdamW, foreach or
# fused: the controls, which must not sync), ``fused`` (the projected optimizer built from AdamW(fused=True): dense
# parameters go through torch's fused Adam), ``base`` ("sgd": from SGD with momentum), ``layerwise``, ``ddp``
# (layer-wise, all-reducing in its hooks over a process group of one), ``resume`` (checkpointed and loaded into a
# fresh optimizer after the warm-up, as a resume does), ``expect`` (syncs per step by design). The rest are
# ProjectedOptimizer options; ``nonfinite`` is "ignore" unless a row sets it.
SYNC_ROWS: dict[str, dict[str, Any]] = {
    "torch-adamw": {"torch": "foreach"},
    "torch-adamw-fused": {"torch": "fused"},
    "svd": {"projector": "svd"},
    "svd-fused": {"projector": "svd", "fused": True},
    "rsvd": {"projector": "rsvd"},
    "dct": {"projector": "dct"},
    "dct-fft": {"projector": "dct", "dct_scorer": "fft"},
    "random": {"projector": "random"},
    "online_pca": {"projector": "online_pca"},
    "svd-pbits8": {"projector": "svd", "projector_bits": 8},
    "online_pca-pbits4": {"projector": "online_pca", "projector_bits": 4},  # P stored with stochastic rounding
    "svd-state8bit": {"projector": "svd", "state_bits": 8},
    "dct-frugal": {"projector": "dct", "residual": "frugal"},
    "svd-fira": {"projector": "svd", "residual": "fira"},
    "apollo": {"residual": "apollo"},  # APOLLO's Gaussian projector
    "svd-sgd": {"projector": "svd", "base": "sgd"},
    "random-resumed": {"projector": "random", "resume": True},
    "svd-state8bit-resumed": {"projector": "svd", "state_bits": 8, "resume": True},
    "layerwise": {"projector": "svd", "layerwise": True},
    "layerwise-random": {"projector": "random", "layerwise": True},
    # The rank-agreement check (layerwise.py ``_agree``) reads one flag per step by design.
    "layerwise-ddp": {"projector": "svd", "layerwise": True, "ddp": True, "expect": 1},
    "svd-nonfinite-skip": {"projector": "svd", "nonfinite": "skip", "expect": 1},
    "layerwise-nonfinite-skip": {"projector": "svd", "layerwise": True, "nonfinite": "skip", "expect": 1},
}
SYNC_HARNESS_KEYS = ("torch", "fused", "base", "layerwise", "ddp", "resume", "expect")
SYNC_WARMUP = 2  # the first step refreshes (chooses the subspace); the second is the first ordinary one
SYNC_GAP = 10_000  # update_gap: no refresh after the first step, so the checked steps are steady ones
MICRO_BATCHES = 2  # per step; the first backward outside step() (layer-wise: accumulated in the subspace)
SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's text: "called a synchronizing CUDA operation"
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "sync_presets": ["1B"],
        "sync_steps": 3,
        "sync_reps": 10,
        "presets": ["130M", "350M", "1B"],
        "reps": 30,
        "refreshes": 3,
        "model": "130M",
        "blocks": None,
        "batch": 4,
        "seq": 256,
        "steps": 10,
        "rank": 256,
        "test_timeout": 300,
    },
    "quick": {
        "sync_presets": ["130M"],
        "sync_steps": 3,
        "sync_reps": 3,
        "presets": ["130M"],
        "reps": 4,
        "refreshes": 1,
        "model": "130M",
        "blocks": 2,
        "batch": 1,
        "seq": 64,
        "steps": 3,
        "rank": 256,
        "test_timeout": 120,
    },
    "smoke": {
        "sync_presets": ["tiny"],
        "sync_steps": 2,
        "sync_reps": 2,
        "presets": ["tiny"],
        "reps": 2,
        "refreshes": 1,
        "model": "demo",
        "blocks": 2,
        "batch": 2,
        "seq": 32,
        "steps": 2,
        "rank": 16,
        "test_timeout": 120,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer presets, steps and blocks (an H100: < 3 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: what the test runs")
    parser.add_argument(
        "--quick-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full mode: make the quick pass (NAME_quick.*) before the full one (default: yes)",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed", "32-true"])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help=f"where the JSON and Markdown go ({RESULTS})")
    parser.add_argument(
        "--name", help="file stem: NAME.json, NAME.md (default gpu_suite on CUDA, gpu_suite_cpu on a CPU)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a shared CPU")
    parser.add_argument(
        "--test-timeout", type=int, help="seconds for the CUDA tests' pytest run (default 300; quick/smoke 120)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --quick --device cpu for the CPU path)")
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.name = args.name or ("gpu_suite" if args.device == "cuda" else "gpu_suite_cpu")  # a CPU run is no GPU table
    return args


# -- writing as we go ------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole: a run killed while writing leaves the previous version, never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    for path in sorted(tests_dir.rglob("test_*.py")):
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


def run_cuda_tests(args: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    ids = cuda_test_ids()
    timeout = args.test_timeout or MODES[args.mode]["test_timeout"]
    out.update(node_ids=ids, cuda_available=torch.cuda.is_available())
    if not ids:
        out.update(status="no CUDA-marked tests found", passed=0, failed=0, errors=0, skipped=0)
        return
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={xml}", *ids]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            out.update(status=f"timed out after {timeout} s", passed=0, failed=0)
            return
        out["seconds"] = time.perf_counter() - start
        out["returncode"] = proc.returncode
        out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        if not xml.exists():
            out.update(status="pytest wrote no report", passed=0, failed=0, errors=0, skipped=0)
            return
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


# -- 2. steady steps under CUDA's sync debug mode --------------------------------------------------------------------


@contextlib.contextmanager
def cuda_sync_debug(mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` ("error" or "warn") until exit, whatever happens inside."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def sync_debug_for(device: str) -> Callable[[str], contextlib.AbstractContextManager] | None:
    """The sync debug context for ``device``; None on a CPU, where torch has no such mode (nothing there syncs)."""
    return cuda_sync_debug if device == "cuda" else None


def is_sync_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and SYNC_MESSAGE in str(err)


def _frame(f: traceback.FrameSummary) -> str:
    path = Path(f.filename)
    where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else Path(*path.parts[-3:]).as_posix()
    return f"{where}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def package_frames(frames: traceback.StackSummary, package: Path = PACKAGE, limit: int = 4) -> list[str]:
    """The innermost ``limit`` frames of ``package`` (innermost first): where our code asked for the sync. When
    none is ours (the benchmark itself synced), the innermost two frames whatever their file."""
    ours = [f for f in frames if Path(f.filename).is_relative_to(package)]
    return [_frame(f) for f in reversed(ours or list(frames)[-2:])][:limit]


def check_syncs(
    step: Callable[[], None],
    steps: int,
    debug: Callable[[str], contextlib.AbstractContextManager],
    package: Path = PACKAGE,
) -> dict[str, Any]:
    """Run ``steps`` steady steps with every synchronizing CUDA operation an error; the first one ends the run and
    is recorded (message, and where in ``package`` it came from). After a sync, the same number of steps again with
    syncs as warnings, to count all of them and where each came from (the state those steps start from may be
    half a step on: harmless for counting). An error other than a sync in the checked steps is raised."""
    report: dict[str, Any] = {"checked_steps": steps, "synced": False}
    try:
        with debug("error"):
            for _ in range(steps):
                step()
    except RuntimeError as err:
        if not is_sync_error(err):
            raise
        lines = str(err).strip().splitlines()
        report.update(
            synced=True,
            message=lines[0] if lines else "",
            where=package_frames(traceback.extract_tb(err.__traceback__), package),
        )
    if not report["synced"]:
        return report
    sites: Counter[tuple[str, ...]] = Counter()

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if SYNC_MESSAGE in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if f.filename != warnings.__file__]
            sites[tuple(package_frames(traceback.StackSummary.from_list(stack), package))] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            with debug("warn"):
                for _ in range(steps):
                    step()
    except Exception as err:  # the first finding stands; the count is then a lower bound
        report["warn_pass_error"] = f"{type(err).__name__}: {str(err).strip()[:300]}"
    report["syncs_per_step"] = sum(sites.values()) / steps
    report["sites"] = [{"per_step": n / steps, "where": list(where)} for where, n in sites.most_common()]
    return report


def block_shapes(preset: str) -> list[tuple[int, ...]]:
    """Every parameter's shape in one decoder block of ``preset``: the seven 2-D weights and the two norms."""
    from lightning_lowrank.memory.presets import LlamaSkeleton, llama_preset

    if preset == "tiny":
        model = LlamaSkeleton(bench_optimizer_step.TINY, device="meta")
    else:
        model = llama_preset(preset, device="meta")
    return [tuple(p.shape) for p in model.layers[0].parameters()]


def sync_presets(mode: dict[str, Any], device: str) -> list[str]:
    """On a CPU (no sync check, and no bf16 matmul units) the quick run's rows take the tiny block."""
    return ["tiny"] if device == "cpu" and mode is MODES["quick"] else mode["sync_presets"]


class SyncRow:
    """One row's optimizer on its own copy of a block's weights (2-D: projected; norms: dense), stepped as training
    steps it: ``MICRO_BATCHES`` backward passes of the loss sum(p * g) (each gradient is g: no model to run), the
    last inside ``step(closure)``, so a layer-wise optimizer updates in its hooks."""

    def __init__(self, spec: dict[str, Any], shapes: list[tuple[int, ...]], rank: int, device: torch.device) -> None:
        self.spec, self.rank, self.device = spec, rank, device
        self.layerwise = bool(spec.get("layerwise"))
        self.group_made = False
        gen = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16
        self.params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype)) for s in shapes]
        self.grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        self.opt: Any = None

    def open(self) -> None:
        """The process group (``ddp`` rows), then the optimizer; ``close`` undoes both, also after a failure."""
        if self.spec.get("ddp"):  # a world of one: the all-reduce path runs, as on rank 0 of many
            import torch.distributed as dist

            if dist.is_initialized():
                raise RuntimeError("a torch.distributed process group exists already; the ddp row needs its own")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.group_made = True
        self.opt = self.build()

    def build(self) -> torch.optim.Optimizer:
        from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
        from lightning_lowrank.optim.projected import ProjectedOptimizer

        spec, lr = self.spec, 1e-3
        if "torch" in spec:
            return torch.optim.AdamW(self.params, lr=lr, **{spec["torch"]: True})
        if spec.get("base") == "sgd":
            base: torch.optim.Optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        else:
            base = torch.optim.AdamW(self.params, lr=lr, **({"fused": True} if spec.get("fused") else {}))
        options = {k: v for k, v in spec.items() if k not in SYNC_HARNESS_KEYS}
        options.setdefault("nonfinite", "ignore")
        names = {p: f"block.{i}" for i, p in enumerate(self.params) if p.ndim == 2}
        cls = LayerwiseProjectedOptimizer if self.layerwise else ProjectedOptimizer
        opt = cls.from_optimizer(base, names, rank=self.rank, update_gap=SYNC_GAP, **options)
        if self.layerwise:
            opt.attach()
            if spec.get("ddp"):
                opt.all_reduce_in_hooks()
        return opt

    def backward(self) -> torch.Tensor:
        loss = sum((p * g).sum() for p, g in zip(self.params, self.grads))
        loss.backward()
        return loss

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for _ in range(MICRO_BATCHES - 1):
            self.backward()
        if self.layerwise:
            self.opt.step(self.backward)
        else:
            self.backward()
            self.opt.step()

    def resume(self) -> None:
        """Checkpoint the optimizer (``torch.save``), load it back as a resume does (each tensor on the device it
        was saved from, ``weights_only``) into a fresh optimizer over the same weights."""
        buffer = io.BytesIO()
        torch.save(self.opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        self.close_hooks()
        self.opt = self.build()
        self.opt.load_state_dict(saved)

    def close_hooks(self) -> None:
        if self.opt is not None and hasattr(self.opt, "detach"):  # layer-wise hooks live on the weights
            self.opt.detach()

    def close(self) -> None:
        self.close_hooks()
        if self.group_made:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.group_made = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sync_row(
    name: str,
    spec: dict[str, Any],
    shapes: list[tuple[int, ...]],
    rank: int,
    args: argparse.Namespace,
    debug: Callable[[str], contextlib.AbstractContextManager] | None,
) -> dict[str, Any]:
    """Warm up, check the steady steps for syncs (CUDA), time a few; any failure is the row's, never the section's."""
    mode = MODES[args.mode]
    device = torch.device(args.device)
    row: dict[str, Any] = {"name": name, "options": spec, "expected_syncs_per_step": spec.get("expect", 0)}
    bench = None
    try:
        bench = SyncRow(spec, shapes, rank, device)
        bench.open()
        for _ in range(SYNC_WARMUP):
            bench.step()
        if spec.get("resume"):
            bench.resume()  # the check starts at the first step after loading, where a resume's reads would be
        _sync(device)
        if debug is None:
            row["sync"] = {"checked_steps": 0, "skipped": "CPU: torch has no sync debug mode there"}
        else:
            row["sync"] = check_syncs(bench.step, mode["sync_steps"], debug)
        times = []
        for _ in range(mode["sync_reps"]):
            _sync(device)
            start = time.perf_counter()
            bench.step()
            _sync(device)  # also surfaces an asynchronous CUDA error as this row's
            times.append((time.perf_counter() - start) * 1e3)
        row.update(
            status="ok",
            step_ms=statistics.median(times),
            step_ms_min=min(times),
            state_bytes=peers.state_bytes(bench.opt),
            optimizer=type(bench.opt).__name__,
        )
    except Exception as err:  # a crash is this row's finding: record it, go on with the next row
        row.update(status="failed", error=f"{type(err).__name__}: {str(err).strip()[:500]}")
        row["where"] = package_frames(traceback.extract_tb(err.__traceback__))
    finally:
        try:
            if bench is not None:
                bench.close()
        except Exception as err:  # after a crash teardown may fail too; the next rows still run
            row["close_error"] = f"{type(err).__name__}: {str(err).strip()[:300]}"
        del bench
        if device.type == "cuda":  # free the row's memory now (on a CPU a collection costs more than the row)
            gc.collect()
    return row


def run_sync_check(args: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    mode = MODES[args.mode]
    debug = sync_debug_for(args.device)
    out.update(
        dtype="bfloat16",
        warmup_steps=SYNC_WARMUP,
        micro_batches=MICRO_BATCHES,
        checked_steps=mode["sync_steps"] if debug else 0,
        timed_steps=mode["sync_reps"],
        check=(
            'torch.cuda.set_sync_debug_mode("error") over the steady steps; after a sync, "warn" to count them all'
            if debug
            else "skipped on a CPU: torch's sync debug mode is CUDA's; the rows ran and were timed without it"
        ),
        presets={},
    )
    for preset in sync_presets(mode, args.device):
        shapes = block_shapes(preset)
        named = [shape for shape in shapes if len(shape) == 2]
        rank = bench_optimizer_step.GALORE_RANKS[preset]
        dims = ", ".join(sorted({f"{m}x{n}" for m, n in named}))
        entry: dict[str, Any] = {
            "title": f"LLaMA-{preset} block: {len(named)} projected weights ({dims}) and 2 norms, rank {rank}",
            "rank": rank,
            "rows": [],
        }
        out["presets"][preset] = entry
        for name, spec in SYNC_ROWS.items():
            t0 = time.perf_counter()
            row = run_sync_row(name, spec, shapes, rank, args, debug)
            entry["rows"].append(row)
            reference = entry["rows"][0]
            if row.get("status") == "ok" and reference.get("status") == "ok":
                row["state_ratio"] = row["state_bytes"] / reference["state_bytes"]
            print(f"[sync_check] {preset} {name}: {sync_cell(row)} ({time.perf_counter() - t0:.1f} s)", flush=True)
            save()


# -- 3. the optimizer-step table -------------------------------------------------------------------------------------


def step_presets(mode: dict[str, Any], dtype: str, device: str) -> list[str]:
    """A real block's bf16 step is ~20x slower on a CPU than in fp32 (no bf16 matmul units): the quick CPU run
    takes the tiny block for bf16 instead."""
    if device == "cpu" and dtype == "bfloat16" and mode is MODES["quick"]:
        return ["tiny"]
    return mode["presets"]


def run_optimizer_step(args: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    """One ``bench_optimizer_step.main`` per dtype and preset, each writing its JSON into ``--out-dir``; the suite's
    files are rewritten after each, so a killed run keeps every finished preset."""
    mode = MODES[args.mode]
    out.update(optimizers=list(STEP_OPTIMIZERS), tables={})
    for dtype in ("float32", "bfloat16"):
        for preset in step_presets(mode, dtype, args.device):
            part = args.out_dir / f"{args.name}_step_{dtype}_{preset}.json"
            argv = ["--device", args.device, "--dtype", dtype, "--presets", preset]
            argv += ["--reps", str(mode["reps"]), "--refreshes", str(mode["refreshes"])]
            argv += ["--only", *STEP_OPTIMIZERS, "--json", str(part)]
            print(f"[optimizer_step] bench_optimizer_step.py {' '.join(argv)}", flush=True)
            result = bench_optimizer_step.main(argv)
            table = out["tables"].setdefault(dtype, {"argv": [], "config": result["config"], "presets": {}})
            table["argv"].append(argv)
            table["presets"].update(result["presets"])
            save()


# -- 4. the memory of real training steps ----------------------------------------------------------------------------


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


def run_training_memory(args: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    mode = MODES[args.mode]
    cuda = args.device == "cuda"
    out.update(
        model="ByteLM with LLaMA-130M shapes" if mode["model"] == "130M" else "ByteLM demo shapes (d_model 128)",
        blocks=mode["blocks"] or 12,
        batch=mode["batch"],
        seq=mode["seq"],
        steps=mode["steps"],
        rank=mode["rank"],
        precision=args.precision,
        peak_source=(
            "torch.cuda.max_memory_allocated and MemoryPhases(every=1) per-phase peaks"
            if cuda
            else "CPU: no CUDA counters; the memory report's byte counts (parameters + largest gradients + optimizer "
            "state, no activations) and the process's resident set size"
        ),
        configs={},
    )
    for name, options in TRAIN_CONFIGS.items():
        print(f"[training_memory] {name}: {options or 'torch AdamW, Lightning single-device strategy'}", flush=True)
        try:
            out["configs"][name] = train_once(name, options, args)
        except Exception as err:  # one configuration failing must not lose the others
            out["configs"][name] = {"config": name, "options": options, "error": f"{type(err).__name__}: {err}"}
        adamw = out["configs"].get("adamw", {})
        for row in out["configs"].values():
            if "error" not in row and adamw and "error" not in adamw:
                row["state_ratio"] = row["state_bytes"] / adamw["state_bytes"]
                if cuda:
                    row["peak_ratio"] = row["peak_allocated_bytes"] / adamw["peak_allocated_bytes"]
        save()


# -- output ----------------------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:.1f}"


def sync_cell(row: dict[str, Any]) -> str:
    """A row's sync finding in one line."""
    if row.get("status") == "failed":
        where = f" at `{row['where'][0]}`" if row.get("where") else ""
        return f"**failed**: {row['error']}{where}"
    sync = row.get("sync", {})
    if "skipped" in sync:
        return "not checked (CPU)"
    if not sync.get("synced"):
        return f"no sync in {sync.get('checked_steps', 0)} steps"
    where = f" at `{sync['where'][0]}`" if sync.get("where") else ""
    per_step = sync.get("syncs_per_step")
    count = "" if per_step is None else f"; {per_step:g} per step"
    expected = row.get("expected_syncs_per_step", 0)
    verdict = "as expected" if per_step is not None and expected and per_step <= expected else "**synced**"
    return f"{verdict}: {sync['message']}{where}{count}"


def markdown_sync(sync: dict[str, Any]) -> list[str]:
    lines = [
        f"bfloat16 weights; {SYNC_WARMUP} warm-up steps (the first refreshes), each step {MICRO_BATCHES} "
        f"micro-batches; {sync.get('checked_steps')} steady steps checked, {sync.get('timed_steps')} timed. "
        f"Check: {sync.get('check')}.",
        "",
    ]
    for preset in sync["presets"].values():
        lines += [preset["title"], ""]
        lines += ["| row | optimizer | step ms | state MiB | x AdamW | sync check |", "|---|---|---:|---:|---:|---|"]
        details = []
        for r in preset["rows"]:
            if r.get("status") == "ok":
                cells = [r["optimizer"], f"{r['step_ms']:.2f}", f"{r['state_bytes'] / MIB:.2f}"]
                cells.append(f"{r['state_ratio']:.3f}" if "state_ratio" in r else "")
            else:
                cells = ["", "", "", ""]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {sync_cell(r)} |")
            for site in r.get("sync", {}).get("sites", []):
                details.append(
                    f"- {r['name']}, {site['per_step']:g} per step: " + " <- ".join(f"`{w}`" for w in site["where"][:3])
                )
        if details:
            lines += ["", "Every sync (warn mode), innermost frame first:", "", *details]
        lines.append("")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cuda = result["device"] == "cuda"
    done = result["seconds"]
    lines = [
        "# GPU suite",
        "",
        f"- Command: `{result['command']}` (mode {result['mode']})",
        f"- Device: {m['device']}; torch {m['torch']}; {m['platform']}; {m['cpu_count']} CPUs",
        f"- Date: {m['date']}; code: {m['git']}",
        f"- Seconds per section: {', '.join(f'{k} {v:.0f}' for k, v in done.items())}",
    ]
    if not cuda:
        lines.append(
            "- **CPU run**: the CUDA tests are skipped, the sync check is not made and there are no CUDA peaks; the "
            "training peaks below are the memory report's byte counts and the process's RSS. A smoke result, not "
            "the GPU figures."
        )

    def head(number: int, section: str, title: str) -> list[str]:
        cut = "" if section in done else " (cut short: this section had not finished)"
        failed = [f"failed to run: {result[section]['error']}", ""] if "error" in result[section] else []
        return ["", f"## {number}. {title}{cut}", "", *failed]

    tests = result.get("cuda_tests")
    if tests is not None:
        lines += head(1, "cuda_tests", "CUDA-marked tests")
        if "node_ids" in tests:
            lines.append(
                f"{len(tests['node_ids'])} marked test functions ({', '.join(f'`{i}`' for i in tests['node_ids'])}): "
                f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, "
                f"{tests.get('skipped', 0)} skipped ({tests.get('status', 'running')})."
            )
            lines += [f"- failed: `{t}`" for t in tests.get("failed_tests", [])]
    sync = result.get("sync_check")
    if sync is not None:
        lines += head(2, "sync_check", "Steady steps under CUDA's sync debug mode")
        if "presets" in sync:
            lines += markdown_sync(sync)
    step = result.get("optimizer_step")
    if step is not None:
        lines += head(3, "optimizer_step", "Optimizer step on LLaMA layer shapes")
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
        lines += head(4, "training_memory", "Memory of real training steps")
        if "configs" in train:
            lines += [
                f"{train['model']}, {train['blocks']} blocks, batches of {train['batch']} x {train['seq']} tokens, "
                f"{train['steps']} steps, rank {train['rank']}, precision {train['precision']}. Peaks: "
                f"{train['peak_source']}.",
                "",
            ]
            if cuda:
                row_head = "| config | state MiB | x AdamW | params MiB | grads MiB | peak allocated MiB | x AdamW "
                row_head += "| forward | backward | optimizer step | batch end | s/step |"
                lines += [row_head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            else:
                row_head = "| config | state MiB | x AdamW | params MiB | grads MiB | params+grads+state MiB "
                row_head += "| max RSS MiB | RSS growth MiB | s/step |"
                lines += [row_head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
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


RUNNERS = {
    "cuda_tests": run_cuda_tests,
    "sync_check": run_sync_check,
    "optimizer_step": run_optimizer_step,
    "training_memory": run_training_memory,
}


def run_pass(args: argparse.Namespace, command: str, reuse: dict[str, Any]) -> dict[str, Any]:
    """Every section in ``args.mode``, the files rewritten after each table or row; ``reuse`` carries the CUDA
    tests' result from the quick pass into the full one (they do not depend on the mode)."""
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "command": command,
        "mode": args.mode,
        "device": args.device,
        "machine": peers.machine_info(bench_optimizer_step.PEER_PACKAGES, device),
        "settings": MODES[args.mode],
        "seconds": {},
    }
    json_path, md_path = args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.md"

    def save() -> None:
        write_atomic(json_path, json.dumps(result, indent=1, default=str) + "\n")
        try:
            text = markdown(result)
        except Exception as err:  # a drawing bug must not end the run: the JSON has every figure
            text = (
                f"# GPU suite\n\nThe tables could not be drawn ({type(err).__name__}: {err}); see {json_path.name}.\n"
            )
        write_atomic(md_path, text)

    start = time.perf_counter()
    for section in args.sections:
        t0 = time.perf_counter()
        print(f"== {section} ({args.mode})", flush=True)
        if section in reuse:
            result[section] = {**reuse[section], "from": "the quick pass"}
        else:
            result[section] = out = {}
            save()  # the section shows as started (and, if the run dies in it, as cut short)
            try:
                RUNNERS[section](args, out, save)
            except Exception as err:  # keep what the section finished, and the other sections
                out["error"] = f"{type(err).__name__}: {err}"
        result["seconds"][section] = time.perf_counter() - t0
        save()
        print(
            f"== {section} done in {result['seconds'][section]:.0f} s "
            f"({time.perf_counter() - start:.0f} s into the {args.mode} pass)",
            flush=True,
        )
    result["seconds"]["total"] = time.perf_counter() - start
    save()
    print(markdown(result))
    print(f"wrote {json_path} and {md_path} in {result['seconds']['total']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; on CUDA in full mode the quick pass first (``--no-quick-first`` skips it). Returns the last
    pass's result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    passes = [args]
    if args.mode == "full" and args.quick_first:
        passes.insert(0, argparse.Namespace(**{**vars(args), "mode": "quick", "name": f"{args.name}_quick"}))
    reuse: dict[str, Any] = {}
    for run in passes:
        result = run_pass(run, command, reuse)
        if "cuda_tests" in result and "error" not in result["cuda_tests"]:
            reuse["cuda_tests"] = result["cuda_tests"]
    return result


if __name__ == "__main__":
    main()
