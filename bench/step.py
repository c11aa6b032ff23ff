"""Step-time and memory benchmark: what does the Mixup regulariser cost over plain SFT?

    python bench/step.py                                  # SmolLM2-135M, batch 8 x 512 ShareGPT tokens, CPU
    python bench/step.py --batch_size 16 --seq_len 2048 --dtype bfloat16   # on a GPU
    python bench/step.py --lengths sharegpt --seq_len 1024 --variants fused,fused_pf   # padded vs padding-free

Variants, each in a fresh process on the same model, batches and settings:
    trl      stock TRL SFTTrainer, NTP
    ntp      sftmix --loss_type ntp
    plain    sftmix SFTMix, plain loss (head applied again to the mixed states)
    fused    sftmix SFTMix, fused loss (mixed logits from the NTP logits tiles)
    fused_pf the same, padding-free (--padding_free true: the batch's sequences concatenated, no padding)
    ntp_pf   sftmix --loss_type ntp, padding-free
    scoring  `sftmix dynamics` scoring throughput vs a plain forward over the same tokens
Prints the median step time (forward + backward + optimizer) over the timed steps, the
throughput in real (non-padding) tokens per second over the timed steps, peak memory (peak
RSS of the process on CPU; peak allocated on GPU) and ratios to `trl`.

--lengths fixed (default) cuts every example to exactly seq_len tokens, so no batch has padding;
--lengths sharegpt keeps ShareGPT's own lengths (cut to seq_len by sftmix's truncation), which is
where padding-free batches save work.
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

VARIANTS = ("trl", "ntp", "plain", "fused", "ntp_pf", "fused_pf")


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
    parser.add_argument("--layers", type=int, default=None,
                        help="a random-init stand-in: the model's config and tokenizer with only this many layers")
    parser.add_argument("--lengths", default="fixed", choices=["fixed", "sharegpt"],
                        help="fixed: every example exactly seq_len tokens; sharegpt: ShareGPT's own lengths")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return
    from sftmix.model import resolve_model_path

    args.model = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        if args.layers:
            args.model = random_init_model(args.model, args.layers, Path(scratch) / "model")
        args.data = str(Path(scratch) / "batches.json")
        prepare_examples(args)
        results = {variant: spawn(args, variant) for variant in args.variants.split(",")}
    report(args, results)


def random_init_model(source: str, layers: int, target: Path) -> str:
    """The source model's architecture and tokenizer with `layers` layers and random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


def prepare_examples(args) -> None:
    """(steps + warmup) * batch ShareGPT examples, each cut to exactly seq_len tokens (identical shapes), or
    with their own lengths up to seq_len (--lengths sharegpt)."""
    from sftmix.data import build_dataset
    from sftmix.model import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    needed = (args.steps + args.warmup) * args.batch_size
    if args.lengths == "sharegpt":
        dataset, _ = build_dataset(None, tokenizer, max_length=args.seq_len, max_examples=needed + 32)
        Path(args.data).write_text(json.dumps(dataset.select(range(needed)).to_dict()))
        return
    dataset, _ = build_dataset(None, tokenizer, max_length=args.seq_len, max_examples=needed * 6, truncation="right")
    full = [i for i, ids in enumerate(dataset["input_ids"]) if len(ids) == args.seq_len][:needed]
    if len(full) < needed:
        raise SystemExit(f"only {len(full)} ShareGPT examples reach {args.seq_len} tokens; lower --seq_len")
    rows = dataset.select(full).to_dict()
    Path(args.data).write_text(json.dumps(rows))


def spawn(args, variant: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--data", args.data, "--model", args.model,
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--dtype", args.dtype, "--lengths", args.lengths,
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
        learning_rate=2e-6, bf16=args.dtype == "bfloat16", activation_checkpointing=args.gradient_checkpointing,
        save_strategy="no", report_to=[], logging_steps=total, max_length=args.seq_len, disable_tqdm=True,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(), seed=0,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.start, self.seen = [], [], 0.0, 0
            self.trainer = None  # set below; sftmix counts the real tokens it trains on (TRL's num_tokens)

        def on_step_begin(self, *_, **__):
            _sync()
            self.start = time.perf_counter()
            self.seen = getattr(self.trainer, "_total_train_tokens", 0)

        def on_step_end(self, *_, **__):
            _sync()
            self.times.append(time.perf_counter() - self.start)
            self.tokens.append(getattr(self.trainer, "_total_train_tokens", 0) - self.seen)

    timer = StepTimer()
    if args.worker == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(load_model(args.model), args=SFTConfig(**settings),
                             train_dataset=dataset.remove_columns("id"), processing_class=tokenizer, callbacks=[timer])
    else:
        from sftmix.config import SFTMixConfig
        from sftmix.model import training_init_kwargs
        from sftmix.trainer import SFTMixTrainer

        loss_type = "ntp" if args.worker.startswith("ntp") else "sftmix"
        config = SFTMixConfig(**settings, loss_type=loss_type, fused_loss=args.worker != "plain",
                              padding_free=args.worker.endswith("_pf"))
        model = load_model(args.model, **training_init_kwargs(config))  # as `sftmix train` loads it
        groups = {example_id: ("confident" if i % 2 else "unconfident") for i, example_id in enumerate(rows["id"])}
        trainer = SFTMixTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                groups=groups if loss_type != "ntp" else None, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer.trainer = trainer
    trainer.train()
    timed, tokens = timer.times[args.warmup:], timer.tokens[args.warmup:]
    throughput = sum(tokens) / sum(timed) if sum(tokens) else None  # stock TRL: not counted here
    return {"median_step_s": statistics.median(timed), "steps_s": timed, "tokens_per_s": throughput,
            **_peak_memory()}


def scoring_throughput(args, rows: dict) -> dict:
    """Tokens/s of dynamics scoring vs a plain forward (full logits) over the same length batches."""
    import datasets
    import torch

    from sftmix.model import load_model, load_tokenizer
    from sftmix.scoring import length_batches, pad_batch, score_model

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
    name = f"random-init {args.layers}-layer stand-in" if args.layers else Path(args.model).name
    print(f"\nmodel {name}, batch {args.batch_size} x {args.seq_len} ({args.lengths} lengths), "
          f"{args.dtype}, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, AdamW, {args.steps} timed steps after "
          f"{args.warmup} warm-up; device: {device}\n")
    base = results.get("trl")
    print("| variant | median step (s) | vs trl | real tokens/s | peak memory (MiB) | vs trl |")
    print("|---|---|---|---|---|---|")
    names = {"trl": "(a) stock TRL SFTTrainer NTP", "ntp": "(b) sftmix --loss_type ntp",
             "plain": "(c) sftmix SFTMix, plain loss", "fused": "(d) sftmix SFTMix, fused loss",
             "ntp_pf": "(e) sftmix --loss_type ntp, padding-free", "fused_pf": "(f) sftmix SFTMix, fused, padding-free"}
    for variant in VARIANTS:
        if variant not in results:
            continue
        result = results[variant]
        time_ratio = f"{result['median_step_s'] / base['median_step_s']:.3f}" if base else "-"
        memory_ratio = f"{result['peak_mem_mb'] / base['peak_mem_mb']:.3f}" if base else "-"
        throughput = f"{result['tokens_per_s']:.0f}" if result.get("tokens_per_s") else "-"
        print(f"| {names[variant]} | {result['median_step_s']:.2f} | {time_ratio} | {throughput} | "
              f"{result['peak_mem_mb']:.0f} | {memory_ratio} |")
    if "fused" in results and "ntp" in results:
        ratio = results["fused"]["median_step_s"] / results["ntp"]["median_step_s"]
        print(f"\nfused / sftmix-ntp step time: {ratio:.3f}")
    if "fused" in results and "fused_pf" in results:
        ratio = results["fused_pf"]["tokens_per_s"] / results["fused"]["tokens_per_s"]
        print(f"SFTMix padding-free / padded throughput (real tokens/s): {ratio:.3f}")
    if "scoring" in results:
        scoring = results["scoring"]
        print(f"dynamics scoring: {scoring['scoring_tokens_per_s']:.0f} tok/s; plain forward: "
              f"{scoring['plain_forward_tokens_per_s']:.0f} tok/s; ratio "
              f"{scoring['scoring_tokens_per_s'] / scoring['plain_forward_tokens_per_s']:.3f}")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
