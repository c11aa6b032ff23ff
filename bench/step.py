"""Step-time and memory benchmark: what does the Mixup regulariser cost over plain SFT?

    python bench/step.py                                  # SmolLM2-135M, batch 8 x 512 ShareGPT tokens, CPU
    python bench/step.py --batch_size 16 --seq_len 2048 --dtype bfloat16   # on a GPU

Variants, each in a fresh process on the same model, batches and settings:
    trl      stock TRL SFTTrainer, NTP
    ntp      sftmix --loss_type ntp
    plain    sftmix SFTMix, plain loss (head applied again to the mixed states)
    fused    sftmix SFTMix, fused loss (mixed logits from the NTP logits tiles)
    scoring  `sftmix dynamics` scoring throughput vs a plain forward over the same tokens
Prints the median step time (forward + backward + optimizer) over the timed steps,
peak memory (peak RSS of the process on CPU; peak allocated on GPU) and ratios to `trl`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("trl", "ntp", "plain", "fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--variants", default="trl,ntp,plain,fused,scoring")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return
    from sftmix.model import resolve_model_path

    args.model = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        args.data = str(Path(scratch) / "batches.json")
        prepare_examples(args)
        results = {variant: spawn(args, variant) for variant in args.variants.split(",")}
    report(args, results)


def prepare_examples(args) -> None:
    """(steps + warmup) * batch ShareGPT examples, each cut to exactly seq_len tokens: identical shapes."""
    from sftmix.data import build_dataset
    from sftmix.model import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    needed = (args.steps + args.warmup) * args.batch_size
    dataset, _ = build_dataset(None, tokenizer, max_length=args.seq_len, max_examples=needed * 6, truncation="right")
    full = [i for i, ids in enumerate(dataset["input_ids"]) if len(ids) == args.seq_len][:needed]
    if len(full) < needed:
        raise SystemExit(f"only {len(full)} ShareGPT examples reach {args.seq_len} tokens; lower --seq_len")
    rows = dataset.select(full).to_dict()
    Path(args.data).write_text(json.dumps(rows))


def spawn(args, variant: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--data", args.data, "--model", args.model,
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--dtype", args.dtype,
               "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing"]
    print(f"[bench] {variant} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------- workers (fresh process each)


def run_worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    rows = json.loads(Path(args.data).read_text())
    if args.worker == "scoring":
        return scoring_throughput(args, rows)
    return training_steps(args, rows)


def training_steps(args, rows: dict) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback

    from sftmix.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    dataset = datasets.Dataset.from_dict(rows)
    total = args.steps + args.warmup
    settings = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_steps=total,
        learning_rate=2e-6, bf16=args.dtype == "bfloat16", gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no", report_to=[], logging_steps=total, max_length=args.seq_len, disable_tqdm=True,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(), seed=0,
    )
    model = load_model(args.model)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *_, **__):
            _sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync()
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    if args.worker == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model, args=SFTConfig(**settings), train_dataset=dataset.remove_columns("id"),
                             processing_class=tokenizer, callbacks=[timer])
    else:
        from sftmix.config import SFTMixConfig
        from sftmix.trainer import SFTMixTrainer

        loss_type = "ntp" if args.worker == "ntp" else "sftmix"
        config = SFTMixConfig(**settings, loss_type=loss_type, fused_loss=args.worker != "plain")
        groups = {example_id: ("confident" if i % 2 else "unconfident") for i, example_id in enumerate(rows["id"])}
        trainer = SFTMixTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                groups=groups if loss_type != "ntp" else None, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[args.warmup:]
    return {"median_step_s": statistics.median(timed), "steps_s": timed, **_peak_memory()}


def scoring_throughput(args, rows: dict) -> dict:
    """Tokens/s of dynamics scoring vs a plain forward (full logits) over the same length batches."""
    import datasets
    import torch

    from sftmix.dynamics import length_batches, pad_batch, score_model
    from sftmix.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    dataset = datasets.Dataset.from_dict(rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, dtype=args.dtype).to(device).eval()
    budget = args.batch_size * args.seq_len
    tokens = sum(len(ids) for ids in rows["input_ids"])
    warm = dataset.select(range(args.batch_size))
    score_model(model, warm, budget, tokenizer.pad_token_id)  # warm-up

    def plain_forward():
        with torch.inference_mode():
            for indices in length_batches([len(ids) for ids in rows["input_ids"]], budget):
                batch = pad_batch(dataset, indices, tokenizer.pad_token_id, device)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    timings = {}
    for name, work in (("plain_forward", plain_forward),
                       ("scoring", lambda: score_model(model, dataset, budget, tokenizer.pad_token_id))):
        _sync()
        start = time.perf_counter()
        work()
        _sync()
        timings[name] = tokens / (time.perf_counter() - start)
    return {"scoring_tokens_per_s": timings["scoring"], "plain_forward_tokens_per_s": timings["plain_forward"]}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "memory": "peak allocated (GPU)"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory": "peak RSS"}


# --------------------------------------------------------------------------- report


def report(args, results: dict) -> None:
    import platform

    import torch

    cpu = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    print(f"\nmodel {Path(args.model).name}, batch {args.batch_size} x {args.seq_len}, {args.dtype}, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, AdamW, {args.steps} timed steps after "
          f"{args.warmup} warm-up; device: {device}\n")
    base = results.get("trl")
    print("| variant | median step (s) | vs trl | peak memory (MiB) | vs trl |")
    print("|---|---|---|---|---|")
    names = {"trl": "(a) stock TRL SFTTrainer NTP", "ntp": "(b) sftmix --loss_type ntp",
             "plain": "(c) sftmix SFTMix, plain loss", "fused": "(d) sftmix SFTMix, fused loss"}
    for variant in VARIANTS:
        if variant not in results:
            continue
        result = results[variant]
        time_ratio = f"{result['median_step_s'] / base['median_step_s']:.3f}" if base else "-"
        memory_ratio = f"{result['peak_mem_mb'] / base['peak_mem_mb']:.3f}" if base else "-"
        print(f"| {names[variant]} | {result['median_step_s']:.2f} | {time_ratio} | {result['peak_mem_mb']:.0f} | "
              f"{memory_ratio} |")
    if "fused" in results and "ntp" in results:
        ratio = results["fused"]["median_step_s"] / results["ntp"]["median_step_s"]
        print(f"\nfused / sftmix-ntp step time: {ratio:.3f}")
    if "scoring" in results:
        scoring = results["scoring"]
        print(f"dynamics scoring: {scoring['scoring_tokens_per_s']:.0f} tok/s; plain forward: "
              f"{scoring['plain_forward_tokens_per_s']:.0f} tok/s; ratio "
              f"{scoring['scoring_tokens_per_s'] / scoring['plain_forward_tokens_per_s']:.3f}")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
