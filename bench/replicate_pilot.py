"""Pilot for `configs/replicate-cpu.yaml`: does plain NTP start to overfit, and what does a step cost?

    python bench/replicate_pilot.py --max_examples 120 --eval_fraction 0.667 --max_length 256 --epochs 3 \
        --learning_rate 1e-4 --references 64 --seed 1          # configs/replicate-cpu.yaml's split, NTP
    python bench/replicate_pilot.py ... --loss_type sftmix --confidence_path runs/x/dynamics/confidence.jsonl

Trains one model on the same held-out split `sftmix run` makes (same max_examples,
eval_fraction and first seed) and scores held-out response NLL before training and
after every epoch, on the held-out ShareGPT part and on the first `--references`
AlpacaEval GPT-4 references. Prints one JSON line per evaluation and, at the end,
the median optimisation-step time (wall clock and process CPU time: on a busy shared
machine, CPU time / threads estimates the wall time on idle cores) and the time of
each evaluation. Nothing is saved but the split (`--output_dir`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

ALPACA_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "gpt4.jsonl"


class EpochEval(TrainerCallback):
    """Held-out NLL before training and after each epoch; step timings (wall and CPU)."""

    def __init__(self, eval_sets: dict, pad_id: int, scoring_batch_tokens: int):
        self.eval_sets, self.pad_id, self.batch_tokens = eval_sets, pad_id, scoring_batch_tokens
        self.steps: list[tuple[float, float]] = []
        self.evaluations: list[dict] = []

    def evaluate(self, model, epoch: float) -> None:
        from sftmix.evaluation import response_perplexity

        was_training = model.training
        started, cpu = time.perf_counter(), time.process_time()
        row = {"epoch": epoch}
        for name, dataset in self.eval_sets.items():
            row[f"{name} NLL"] = round(response_perplexity(model, dataset, self.pad_id, self.batch_tokens,
                                                           desc=name)["nll"], 5)
        row["eval wall s"] = round(time.perf_counter() - started, 1)
        row["eval cpu s"] = round(time.process_time() - cpu, 1)
        print("PILOT " + json.dumps(row), flush=True)
        self.evaluations.append(row)
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.evaluate(model, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = self._step_start
        self.steps.append((time.perf_counter() - wall, time.process_time() - cpu))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        walls, cpus = zip(*self.steps) if self.steps else ((0.0,), (0.0,))
        print("PILOT " + json.dumps({"steps so far": len(self.steps), "median step wall s": round(
            statistics.median(walls), 2), "median step cpu s": round(statistics.median(cpus), 2)}), flush=True)
        self.evaluate(model, round(state.epoch, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_examples", type=int, default=120)
    parser.add_argument("--eval_fraction", type=float, default=0.667)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loss_type", default="ntp")
    parser.add_argument("--confidence_path", default=None)
    parser.add_argument("--references", type=int, default=64, help="AlpacaEval GPT-4 references scored")
    parser.add_argument("--output_dir", default="runs/pilot")
    args = parser.parse_args()

    from sftmix.config import RunConfig, SFTMixConfig
    from sftmix.data import build_dataset, read_groups
    from sftmix.recipes.common import build_trainer, prepare
    from sftmix.recipes.run import hold_out

    output_dir = Path(args.output_dir)
    split = RunConfig(output_dir=str(output_dir), max_examples=args.max_examples, eval_fraction=args.eval_fraction,
                      seeds=[args.seed])
    hold_out(split, output_dir / "data")
    config = SFTMixConfig(
        output_dir=str(output_dir / "train"), dataset_path=str(output_dir / "data" / "train.jsonl"),
        loss_type=args.loss_type, confidence_path=args.confidence_path, learning_rate=args.learning_rate,
        num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, save_strategy="no", logging_steps=5, activation_checkpointing=False, report_to=[],
        disable_tqdm=True,
    )
    prepared = prepare(config)
    eval_sets = {"heldout": build_dataset(str(output_dir / "data" / "heldout.jsonl"), prepared.tokenizer,
                                          args.max_length)[0]}
    if args.references and ALPACA_EVAL.exists():
        eval_sets["alpaca_eval gpt4"] = build_dataset(str(ALPACA_EVAL), prepared.tokenizer, args.max_length,
                                                      args.references)[0]
    print("PILOT " + json.dumps({"train examples": len(prepared.dataset),
                                 **{f"{name} examples": len(data) for name, data in eval_sets.items()},
                                 "train response tokens": sum(sum(t != -100 for t in row) for row in
                                                              prepared.dataset["labels"]),
                                 "train tokens": sum(len(row) for row in prepared.dataset["input_ids"])}), flush=True)
    groups = read_groups(args.confidence_path) if args.loss_type != "ntp" else None
    timer = EpochEval(eval_sets, prepared.tokenizer.pad_token_id, 16384)
    trainer = build_trainer(config, prepared, groups=groups, callbacks=[timer])
    started = time.perf_counter()
    trainer.train()
    walls, cpus = zip(*timer.steps)
    print("PILOT " + json.dumps({
        "steps": len(timer.steps), "median step wall s": round(statistics.median(walls), 2),
        "median step cpu s": round(statistics.median(cpus), 2), "train wall s incl. evals":
        round(time.perf_counter() - started, 1), "sum step wall s": round(sum(walls), 1),
        "sum step cpu s": round(sum(cpus), 1),
    }), flush=True)


if __name__ == "__main__":
    main()
