"""Distributed scoring: how much faster is `sftmix dynamics` scoring with N processes than with one?

    python bench/scoring_processes.py                      # SmolLM2-135M, 96 ShareGPT records, max_length 512, CPU
    python bench/scoring_processes.py --processes 1 8      # on an 8-GPU machine

Each configuration runs `sftmix dynamics --checkpoints MODEL` (one scoring pass over the same
examples) in fresh processes and reads the scoring pass's wall time from scores/00-*.json.
On a CPU the processes share the cores, so three rows are printed: one process with every
core, one process with one thread, and N processes with one thread each (what
`accelerate launch` gives each process). The speed-up that carries over to GPUs, where each
process has its own device, is N processes vs one process with the same per-process resources.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dataset", default=None, help="dataset (default: embedded ShareGPT)")
    parser.add_argument("--max_examples", type=int, default=96)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--scoring_batch_tokens", type=int, default=4096)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from sftmix.model import resolve_model_path

    args.model = resolve_model_path(args.model)
    threads = os.cpu_count() or 1
    rows = []
    for processes in args.processes:
        if processes == 1:
            rows.append((f"1 process, {threads} threads", time_scoring(args, 1, threads)))
            if threads > 1:
                rows.append(("1 process, 1 thread", time_scoring(args, 1, 1)))
        else:
            rows.append((f"{processes} processes, 1 thread each", time_scoring(args, processes, 1)))
    baseline = next(seconds for name, seconds in rows if name == "1 process, 1 thread") if threads > 1 else rows[0][1]
    print(f"\nScoring {args.max_examples} records at max_length {args.max_length} ({args.model})")
    print("| configuration | scoring pass (s) | speed-up vs 1 process, 1 thread |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {baseline / seconds:.2f} |")


def time_scoring(args, processes: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(scratch) / "dynamics"
        command = ["-m", "sftmix.cli", "dynamics", "--checkpoints", args.model, "--output_dir", str(output_dir),
                   "--max_examples", str(args.max_examples), "--max_length", str(args.max_length),
                   "--scoring_batch_tokens", str(args.scoring_batch_tokens)]
        if args.dataset:
            command += ["--dataset_path", args.dataset]
        if processes > 1:
            accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
            command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
                       "--mixed_precision", "no", *command]
        else:
            command = [sys.executable, *command]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        print(f"[bench] {processes} process(es) x {threads} thread(s) ...", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"failed:\n{done.stderr[-3000:]}")
        (scores,) = output_dir.glob("scores/00-*.json")
        return json.loads(scores.read_text())["seconds"]


if __name__ == "__main__":
    main()
