"""Two versions of the package side by side: this checkout against another commit, in one run.

Each round runs the same benchmark once per version, in fresh processes, alternating (A, B, B, A, ...), so drift on
a shared machine falls on both; the figures are the medians over rounds and their ratio (this checkout / the other).
The other commit is exported with ``git archive`` into a temporary directory and put first on ``PYTHONPATH``.

Benchmarks:
* ``step``: ``bench_optimizer_step.py`` (ours-svd and ours-dct by default): ordinary and refresh step time;
* ``small``: ``bench_small_layers.py``: 96 small projected layers, the per-tensor overhead regime.

    python benchmarks/bench_versions.py --base HEAD~1 [--rounds 3] [--presets 130M] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(commit: str, into: Path) -> str:
    """The tree of ``commit`` under ``into``; returns the commit's short hash."""
    data = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return subprocess.run(
        ["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def run_step(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """ordinary and refresh ms per optimizer of ``bench_optimizer_step.py`` run from this checkout against ``tree``'s
    package (the benchmark script is this checkout's, so both versions run the same measurement)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_optimizer_step.py"), "--presets", *args.presets]
    cmd += ["--only", *args.only, "--device", "cpu", "--json", str(out), "--reps", str(args.reps)]
    cmd += ["--refreshes", str(args.refreshes)]
    _run(cmd, tree, args.threads)
    figures = {}
    for preset, result in json.loads(out.read_text())["presets"].items():
        for row in result["rows"]:
            if row.get("status") == "ok":
                figures[f"{preset} {row['name']} step ms"] = row["step_ms"]
                if row.get("refresh_ms") is not None:
                    figures[f"{preset} {row['name']} refresh ms"] = row["refresh_ms"]
    return figures


def run_small(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_small_layers as b; "
        "json.dump(b.main(['--steps', sys.argv[3]]), open(sys.argv[2], 'w'))"
    )
    _run([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(out), str(args.small_steps)], tree, args.threads)
    return {f"small {k} ms": v for k, v in json.loads(out.read_text()).items() if k.startswith("ours")}


def _run(cmd: list[str], tree: Path, threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare this checkout against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["130M"])
    parser.add_argument("--only", nargs="+", default=["ours-svd", "ours-dct"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--refreshes", type=int, default=2)
    parser.add_argument("--small-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench", nargs="+", default=["step", "small"], choices=["step", "small"])
    args = parser.parse_args(argv)
    runners = {"step": run_step, "small": run_small}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        name = export(args.base, base)
        trees = {"this checkout": ROOT, name: base}
        samples: dict[str, dict[str, list[float]]] = {label: {} for label in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:
                for bench in args.bench:
                    figures = runners[bench](trees[label], args, Path(tmp) / f"{bench}.json")
                    for key, value in figures.items():
                        samples[label].setdefault(key, []).append(value)
        mine, theirs = (samples[label] for label in trees)
    print(f"this checkout vs {name}: medians of {args.rounds} rounds, {args.threads} thread(s), cpu")
    result = {}
    for key in mine:
        a, b = statistics.median(mine[key]), statistics.median(theirs[key])
        result[key] = (a, b)
        print(f"  {key:40s} {a:9.3f} vs {b:9.3f}   {a / b:5.2f} x")
    return result


if __name__ == "__main__":
    main()
