"""How the three stages scale with the number of training examples: time, peak RSS of the driver and of each
actor kind, bytes on disk per example (CPU, the embedded model).

    python bench/scale_cpu.py --sizes 10000 100000 1000000          # prints a Markdown table
    python bench/scale_cpu.py --sizes 2000 --cluster none           # one process, no Ray

For each N the training set is N synthetic sentences over the embedded facts vocabulary (3-10 words,
fresh ids); the queries are the embedded ones. Each stage runs as its own driver process (this script,
``stage`` subcommand) so that its peak RSS is its own; on Ray the driver starts a local
instance with ``--cpus`` CPUs; the driver's peak is its own ``getrusage`` at its end; a sampler in this process reads the RSS of every ``ray::<Class>``
process the driver's Ray instance started (gradient, writer, Gram and query actors, the input-planning task) every 0.2 s and keeps each
kind's peak. Threads: the driver and every actor run with ``OMP_NUM_THREADS`` = ``--threads`` (torch's
default on a loaded 2-core machine can be 15x slower). The index is LoRIF c=1 with ``--f`` (8) and the
curvature rank ``--r`` (32), float32: the scale of the stages' state, not the quality, is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("index", "curvature", "query")


def write_training_set(path: Path, n: int, seed: int = 0) -> None:
    """N short sentences over the embedded corpus's words, ids s0 … s{N-1}."""
    from lorif_ray.embedded.facts import build_facts_corpus

    words = sorted({w for e in build_facts_corpus().train for w in e["text"].split()})
    rng = random.Random(seed)
    with open(path, "w") as out:
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
            out.write(json.dumps({"id": f"s{i}", "text": text}) + "\n")


def stage_config(out: Path, train: Path, cluster: str, cpus: int, f: int, r: int):
    from lorif_ray.config import ClusterConfig, Config, DataConfig, QueryConfig
    from lorif_ray.stages.inputs import resolve_inputs

    queries = resolve_inputs(Config(cluster=ClusterConfig(backend="none"))).queries_path
    backend = ClusterConfig(backend="none") if cluster == "none" else ClusterConfig(num_cpus=cpus, gradient_actors=2)
    return Config(data=DataConfig(train=str(train), queries=str(queries), max_length=16, batch_size=32),
                  query=QueryConfig(top_k=10, train_batch_rows=8192), cluster=backend, output_dir=str(out),
                  f=f, r=r, shard_size=4096, progress=False, overwrite=True)


def run_one_stage(args) -> None:
    """The ``stage`` subcommand: one stage of one size, in this (driver) process; prints its report."""
    import logging

    from lorif_ray.distributed.backends import run_stage

    logging.basicConfig(level=logging.WARNING)
    cfg = stage_config(Path(args.out), Path(args.train), args.cluster, args.cpus, args.f, args.r)
    report = run_stage(args.stage, cfg)
    print("REPORT " + json.dumps(report, default=str))


class ActorSampler:
    """Peak RSS (bytes) per ``ray::<Class>`` process title among the descendants of process ``root`` (the
    stage's driver, whose local Ray instance starts every actor), sampled every ``period`` seconds; other Ray
    instances on a shared machine are not counted."""

    def __init__(self, root: int, period: float = 0.2):
        self.root, self.period, self.peaks, self._stop = root, period, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        title = re.compile(r"^ray::(\w+)")
        while not self._stop.is_set():
            try:
                processes = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in processes:
                try:
                    cmd, rss = proc.cmdline(), proc.memory_info().rss
                except psutil.Error:
                    continue
                match = title.match(cmd[0]) if cmd else None
                if match and not match.group(1).endswith(("IDLE", "Agent")):
                    self.peaks[match.group(1)] = max(self.peaks.get(match.group(1), 0), rss)
            self._stop.wait(self.period)

    def __enter__(self) -> "ActorSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def measure_stage(stage: str, out: Path, train: Path, args) -> dict:
    """Run one stage as a child driver process: wall seconds, the driver's peak RSS, actor peaks, report."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "stage", "--stage", stage, "--out", str(out), "--train", str(train),
               "--cluster", args.cluster, "--cpus", str(args.cpus), "--f", str(args.f), "--r", str(args.r)]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ActorSampler(child.pid) as sampler:
        stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"stage {stage} failed:\n{stderr[-4000:]}")
    report = json.loads(next(line for line in stdout.splitlines() if line.startswith("REPORT "))[7:])
    peak = int(re.search(r"PEAK_RSS (\d+)", stderr).group(1))  # the driver's own getrusage, at its end
    return {"seconds": seconds, "driver_rss": peak, "actors": dict(sampler.peaks), "report": report}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    stage = sub.add_parser("stage")
    stage.add_argument("--stage", choices=STAGES, required=True)
    for name in ("--out", "--train", "--cluster"):
        stage.add_argument(name, required=True)
    stage.add_argument("--cpus", type=int, default=2)
    stage.add_argument("--f", type=int, default=8)
    stage.add_argument("--r", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--cluster", choices=("ray", "none"), default="ray")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads of the driver and each actor")
    parser.add_argument("--f", type=int, default=8, help="projection factor of the LoRIF index (c=1)")
    parser.add_argument("--r", type=int, default=32, help="truncation rank of the curvature")
    parser.add_argument("--out", default="outputs/bench_scale")
    parser.add_argument("--keep", action="store_true", help="keep each size's index (default: removed)")
    args = parser.parse_args()
    if args.command == "stage":
        import resource

        run_one_stage(args)
        print(f"PEAK_RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", file=sys.stderr)
        return

    root = Path(args.out)
    rows = []
    for n in args.sizes:
        work = root / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_training_set(work / "train.jsonl", n)
        results = {s: measure_stage(s, work / "run", work / "train.jsonl", args) for s in STAGES}
        disk = directory_bytes(work / "run" / "index")
        rows.append((n, results, disk))
        print(f"N={n}: " + ", ".join(f"{s} {r['seconds']:.0f} s, driver {mib(r['driver_rss'])} MiB"
                                      for s, r in results.items()), flush=True)
        if not args.keep:
            shutil.rmtree(work / "run" / "index", ignore_errors=True)

    print(f"\nLoRIF f={args.f} c=1 r={args.r} on the embedded model, max_length 16, shards of 4096, cluster={args.cluster}"
          f" ({args.cpus} CPUs), {args.threads} thread(s) per process\n")
    print("| N | stage | seconds | examples/s | driver peak RSS (MiB) | actor peak RSS (MiB) by kind | index bytes/example |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for n, results, disk in rows:
        for s, r in results.items():
            actors = ", ".join(f"{k} {mib(v)}" for k, v in sorted(r["actors"].items())) or "–"
            print(f"| {n:,} | {s} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | {mib(r['driver_rss'])} | {actors} | "
                  f"{disk / n:,.0f} |")
    first, last = rows[0], rows[-1]
    for s in STAGES:
        ratio = last[1][s]["driver_rss"] / first[1][s]["driver_rss"]
        print(f"driver peak RSS, {s}: N={last[0]:,} / N={first[0]:,} = {ratio:.2f}x")


if __name__ == "__main__":
    main()
