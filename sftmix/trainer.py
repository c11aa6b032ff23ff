"""`SFTMixTrainer`: TRL's `SFTTrainer` with balanced confident/unconfident batches and the SFTMix loss.

What the method changes relative to SFTTrainer:
1. the train dataloader: `BalancedBatchSampler` puts B/2 confident then B/2
   unconfident examples in every per-device batch, so row k pairs with row k + B/2;
2. the model's forward accepts `sftmix=SFTMixRequest(...)` (forward.py) and then computes the
   loss from the final hidden states *inside* the forward (as TRL's fused LM head
   does), so the LM head is used where FSDP / ZeRO-3 have gathered it;
3. `compute_loss` builds that request (pairs, lambdas, and the normalisers that
   `get_batch_samples` counts once per optimisation step) and logs `ntp_loss`,
   `mixup_loss` and `mixup_lambda` beside what SFTTrainer logs (token accuracy,
   entropy, num_tokens, the MoE router aux loss).

What a run needs around it: `save_model` gathers full weights under sharded engines,
`train` never steps past max_steps and reports train_runtime / train_loss over the whole
run across resumes (`RunTotals`), a NaN/inf loss stops training (`check_finite_loss`),
`record_nll` keeps each example's NLL for online dynamics, and the model card names SFTMix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import seed_worker
from trl import SFTTrainer

from . import distributed
from .config import SFTMixConfig
from .errors import InputError
from .files import write_digest
from .forward import SFTMixOutput, SFTMixRequest, add_sftmix_head
from .hub import write_model_card
from .losses import (
    IGNORE_INDEX,
    balanced_pairs,
    count_mixed_positions,
    sample_lambda,
)
from .model import match_config_dtype
from .sampler import BalancedBatchSampler, ShuffledBatchSampler

logger = logging.getLogger(__name__)




# --------------------------------------------------------------------------- trainer


# SFTConfig fields that sftmix applies itself before the trainer exists: SFTTrainer would reject our loss
# types, warn that model_init_kwargs are ignored (we loaded the model with them), apply the chat template
# a second time (cloning a tokenizer's template resizes the embeddings again), mask the tokenised rows again
# (their labels already supervise the replies only), create a hub repo (sftmix pushes at the end: hub.py),
# and refuse padding-free batches with a max_length (our examples are already cut to it).
def _sftmix_handled(args: SFTMixConfig) -> dict:
    neutral = {"loss_type": "nll", "model_init_kwargs": None, "chat_template_path": None,
               "assistant_only_loss": False, "completion_only_loss": False, "dataset_kwargs": None,
               "push_to_hub": False}
    return neutral | ({"max_length": None} if args.padding_free else {})


@contextlib.contextmanager
def _fields_handled_by_sftmix(args: SFTMixConfig):
    neutral = _sftmix_handled(args)
    saved = {name: getattr(args, name) for name in neutral}
    for name, value in neutral.items():
        setattr(args, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


class SFTMixTrainer(SFTTrainer):
    """SFTTrainer whose loss is `args.loss_type` (sftmix | ntp | equal | mixup_only), taking what SFTTrainer takes.

    `model`: a model, or its name or directory (None: `args.model_name_or_path`, else the embedded default), loaded
    as `sftmix train` loads it. `train_dataset` / `eval_dataset`: a `datasets.Dataset` in any supported format (chat
    `messages`, Alpaca, prompt/completion, ShareGPT), tokenised, masked and cut exactly as `sftmix train` does; None:
    `args.dataset_path`. Rows that already hold `input_ids` and `labels` are used as they are. Every loss_type but
    "ntp" needs the confidence split: `args.confidence_path` (from `sftmix dynamics`), or `groups` (id -> group).
    """

    _tag_names = ["trl", "sftmix"]

    def __init__(
        self, model=None, args: SFTMixConfig | None = None, train_dataset=None, eval_dataset=None,
        processing_class=None, groups: dict[str, str] | None = None, record_nll: bool = False, **kwargs
    ):
        args = args if args is not None else SFTMixConfig()
        distributed.check_launch(args)  # before any model or data is loaded, as a command's start does
        # what the model card names (write_model_card): what was given, else args'
        self._card = (model if isinstance(model, str) else getattr(model, "name_or_path", None),
                      None if train_dataset is None or isinstance(train_dataset, str) else "the train_dataset given")
        model, processing_class = _model_and_tokenizer(model, args, processing_class)
        if train_dataset is None:
            if args.datasets or args.dataset_config is not None:  # resolved by the CLI's recipes (resolve_datasets)
                raise InputError("SFTMixTrainer reads args.dataset_path only: load a `datasets:` mixture or a dataset "
                                 "configuration yourself and pass it as train_dataset")
            train_dataset = args.dataset_path  # None: the embedded default, as `sftmix train`
        train_dataset = _tokenised(train_dataset, args, processing_class, args.max_examples)
        eval_dataset = self._tokenised_eval(eval_dataset, args, processing_class)
        if groups is None and args.loss_type != "ntp" and args.confidence_path is not None:
            from .data import read_groups

            groups = read_groups(args.confidence_path)
        if kwargs.get("peft_config") is None and args.use_peft:
            from trl import get_peft_config

            kwargs["peft_config"] = get_peft_config(args)
        if record_nll:  # keep the `id` column so each example's NLL can be attributed to it
            args.remove_unused_columns = False
        with _fields_handled_by_sftmix(args):
            super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)
        self.mixing = args.loss_type != "ntp"
        self._step: StepCounts | None = None  # set at the start of every optimisation step
        self._micro_batch = 0  # index of the micro-batch within the optimisation step
        self._global_lambda_mean = 0.0
        self._balanced_groups = self._group_indices(groups) if self.mixing else None
        patched = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_sftmix_head(patched)
        self.add_callback(RunTotals())
        # Online training dynamics: example id -> [(epoch, step, response NLL sum, response tokens), ...]
        self.online_nll: dict[str, list[tuple[int, int, float, int]]] | None = None
        if record_nll:
            self.online_nll = defaultdict(list)
            self.data_collator = _CollatorWithIds(self.data_collator)

    @staticmethod
    def _tokenised_eval(eval_dataset, args, tokenizer):
        if isinstance(eval_dataset, dict):
            return {name: _tokenised(part, args, tokenizer) for name, part in eval_dataset.items()}
        return None if eval_dataset is None else _tokenised(eval_dataset, args, tokenizer)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As SFTTrainer's, with a raw evaluation set tokenised as the training set is (not by TRL)."""
        eval_dataset = self._tokenised_eval(eval_dataset, self.args, self.processing_class)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _group_indices(self, groups: dict[str, str] | None) -> tuple[list[int], list[int]]:
        if groups is None:
            raise InputError(
                f"loss_type={self.args.loss_type!r} needs a confidence split: run `sftmix dynamics` on this dataset "
                "and pass --confidence_path <output_dir>/confidence.jsonl (or use --loss_type ntp)"
            )
        ids = self.train_dataset["id"]
        check_ids_match(ids, groups)
        confident = [index for index, example_id in enumerate(ids) if groups[example_id] == "confident"]
        unconfident = [index for index, example_id in enumerate(ids) if groups[example_id] != "confident"]
        if not confident or not unconfident:
            raise InputError(
                f"the confidence split leaves {len(confident)} confident and {len(unconfident)} unconfident examples "
                "in this dataset; SFTMix pairs one of each: re-run `sftmix dynamics` with split_ratio 0.5"
            )
        return confident, unconfident

    def get_train_dataloader(self) -> DataLoader:
        """Trainer's dataloader with sftmix's batch sampler (`sampler.py`): balanced batches for the losses that mix,
        shuffled ones for NTP; each epoch a whole number of steps at every process count and accumulation."""
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed  # as Trainer's sampler
        per_step = args.gradient_accumulation_steps * self.accelerator.num_processes
        if self.mixing:
            confident, unconfident = self._balanced_groups
            sampler = BalancedBatchSampler(confident, unconfident, self._train_batch_size, seed, per_step)
        else:
            sampler = ShuffledBatchSampler(len(self.train_dataset), self._train_batch_size, seed, per_step)
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        loader = DataLoader(  # Trainer's dataloader settings (`_get_dataloader`), with sftmix's batch sampler
            dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
            worker_init_fn=functools.partial(seed_worker, num_workers=args.dataloader_num_workers,
                                             rank=args.process_index),
        )
        # Each rank receives whole batches, round-robin (BatchSamplerShard); their count divides evenly.
        return self.accelerator.prepare(loader)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count, once per optimisation step, what the step's two loss terms are normalised by."""
        if self.state.global_step >= self.state.max_steps:
            return [], None  # resumed from the final step: never train past max_steps (see no_step_past_max_steps)
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step = _step_counts(batch_samples, self.mixing, device)
        self._micro_batch = 0
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_ids = inputs.pop("example_ids", None)
        sequence = sequence_index(inputs)
        request = self._loss_request(inputs["labels"], sequence, model.training, num_items_in_batch)
        request.router_aux = self.aux_loss_enabled
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, sftmix=request)
        loss = outputs.loss
        if outputs.aux_loss is not None:
            # As SFTTrainer: the MoE router loss is a per-micro-batch mean, so it is averaged over accumulation.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss.to(loss.device) / steps
        self._log_terms(model.training, outputs, _batch_tokens(inputs))
        if self.online_nll is not None and example_ids is not None and model.training:
            self._record_online_nll(example_ids, inputs["labels"], sequence, outputs.row_nll)
        if model.training:
            self._micro_batch += 1
        return (loss, outputs) if return_outputs else loss

    def _loss_request(
        self, labels: torch.Tensor, sequence: torch.Tensor | None, training: bool, num_items_in_batch
    ) -> SFTMixRequest:
        """Pairs, lambdas and the two normalisers of this micro-batch.

        Both terms are per-token means over the whole optimisation step, all ranks and all
        accumulated micro-batches, as if the step were one large batch: NTP divides by the step's
        supervised tokens (`num_items_in_batch`, as SFTTrainer does), Mixup by the step's mixed
        positions. Each rank's loss is multiplied by the number of ranks because DDP, FSDP and
        DeepSpeed average the ranks' gradients. Pairs are formed per sequence, also when a
        padding-free batch concatenates them in one row (`sequence`).
        """
        mixing = self.mixing and training
        ntp_weight, mixup_weight = self.args.loss_weights if mixing else (1.0, 0.0)
        shifted = labels[:, 1:]
        ranks = distributed.world_size() if self.args.average_tokens_across_devices else 1
        if num_items_in_batch is None:  # outside a training step (evaluation, direct calls): this batch alone
            ntp_denominator = float((shifted != IGNORE_INDEX).sum())
        else:
            ntp_denominator = float(num_items_in_batch) / ranks
        request = SFTMixRequest(labels, None, None, ntp_weight / max(ntp_denominator, 1), 0.0, self.args.fused_loss,
                                sequence=sequence)
        if mixing:
            request.pair_index = balanced_pairs(num_sequences(labels, sequence), labels.device)
            request.lam = self._lambdas(len(request.pair_index)).to(labels.device)
            step = self._step
            if step is not None and num_items_in_batch is not None:
                across = self.args.average_tokens_across_devices
                mixed_denominator = step.mixed_positions / ranks if across else step.local_mixed_positions
            else:
                mixed_denominator = count_mixed_positions(shifted, request.pair_index, _shifted(sequence))
            request.mixup_scale = mixup_weight / max(mixed_denominator, 1)
        return request

    def _lambdas(self, pairs: int) -> torch.Tensor:
        """This micro-batch's slice of one draw for the whole optimisation step.

        Pairs are numbered as in one large batch: micro-batch by micro-batch, and within one,
        rank 0's pairs first (the order in which the sampler deals batches out). The draw is seeded
        by (seed, step) alone, so every rank draws the same vector; N processes x B/N rows, or
        G accumulated micro-batches of B/G rows, get the lambdas that one batch of B rows gets, and
        a resumed run gets those of the uninterrupted one.
        """
        world, rank = distributed.world_size(), distributed.rank()
        in_step = self._step is not None  # False for a direct compute_loss call outside a training step
        micro_batches, micro_batch = (self._step.micro_batches, self._micro_batch) if in_step else (1, 0)
        step_draw = sample_lambda(self.args.mixup_alpha, micro_batches * world * pairs, self.args.mixup_lambda_per,
                                  seed=(self.args.seed, self.state.global_step))
        start = (micro_batch * world + rank) * pairs
        self._global_lambda_mean = float(step_draw.mean())  # what is logged: the whole step's
        return step_draw[start : start + pairs]

    def _log_terms(self, training: bool, outputs: SFTMixOutput, tokens: int) -> None:
        """Log the values being optimised (the step's NTP and Mixup terms, summed over ranks) and what
        SFTTrainer logs: token accuracy and entropy over the supervised tokens, input tokens seen, MoE aux loss."""
        mode = "train" if training else "eval"
        measured = [outputs.ntp_sum, outputs.mixup_sum, outputs.entropy_sum, outputs.num_correct]
        if outputs.aux_loss is not None:
            measured.append(outputs.aux_loss)
        device = outputs.ntp_sum.device
        dtype = torch.float64 if any(value.dtype == torch.float64 for value in measured) else torch.float32  # exact
        # One device-to-host copy for every logged tensor (a GPU sync each if read one by one).
        ntp_sum, mixup_sum, entropy_sum, correct, *aux = torch.stack(
            [value.detach().to(device, dtype).reshape(()) for value in measured]).tolist()
        local = [ntp_sum, outputs.ntp_count, mixup_sum, outputs.mixup_count, entropy_sum, correct, tokens,
                 aux[0] if aux else 0.0]
        totals = distributed.sum_over_ranks(local, self.accelerator.device)
        ntp_sum, ntp_count, mixup_sum, mixup_count, entropy_sum, correct, tokens, aux_sum = totals
        check_finite_loss(self.state.global_step + (1 if training else 0), ntp_sum, mixup_sum, self.args, training)
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy_sum / max(ntp_count, 1))
        metrics["mean_token_accuracy"].append(correct / max(ntp_count, 1))
        if training:
            self._total_train_tokens += int(tokens)
        metrics["num_tokens"] = [self._total_train_tokens]
        if outputs.aux_loss is not None:
            metrics["aux_loss"].append(aux_sum / distributed.world_size())
        step = self._step if training else None
        if step is not None:
            # Each micro-batch logs its share scaled by the micro-batch count; their mean is the step's value.
            ntp_count, mixup_count = step.ntp_tokens / step.micro_batches, step.mixed_positions / step.micro_batches
        metrics["ntp_loss"].append(ntp_sum / max(ntp_count, 1))
        if self.mixing and training:
            metrics["mixup_loss"].append(mixup_sum / max(mixup_count, 1))
            metrics["mixup_lambda"].append(self._global_lambda_mean)

    def _record_online_nll(
        self, example_ids: list[str], labels: torch.Tensor, sequence: torch.Tensor | None, row_nll: torch.Tensor
    ) -> None:
        """Each example's response NLL when it is trained on, with the epoch and step of that visit."""
        counts = supervised_per_sequence(labels, sequence).tolist()
        epoch = int(math.floor(self.state.epoch or 0.0))
        for example_id, nll, count in zip(example_ids, row_nll.tolist(), counts):
            self.online_nll[example_id].append((epoch, self.state.global_step, nll, count))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save weights `from_pretrained` loads, whatever shards them (also for every checkpoint).

        A collective. Under FSDP2 and ZeRO-3 the full state dict is gathered here, whatever the
        accelerate config says; the engine's own resumable checkpoint is written beside it by Trainer.
        """
        state_dict = distributed.full_state_dict(self.model_wrapped, self.model)
        if state_dict is None:
            super().save_model(output_dir, _internal_call=True)  # True: Trainer never pushes (hub.py does, at the end)
            return
        output_dir = output_dir or self.args.output_dir
        self._save(output_dir, state_dict=state_dict)
        # config.json names the dtype `from_pretrained(dtype="auto")` loads: the saved weights' (ZeRO-3 with bf16
        # saves float32 master weights, and save_pretrained writes the bf16 module's dtype)
        distributed.on_main(match_config_dtype, Path(output_dir))  # every rank: a collective

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """No push per checkpoint: `--push_to_hub` uploads the finished output directory (hub.py)."""

    # ------------------------------------------------------------------ whole-run totals across resumes

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._run_totals().restore(resume_from_checkpoint)
        no_step_past_max_steps(resume_from_checkpoint, self.args.max_steps)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _run_totals(self) -> RunTotals:
        return next(callback for callback in self.callback_handler.callbacks if isinstance(callback, RunTotals))

    def _save_checkpoint(self, model, trial):
        # The loss summed over this train() call so far: Trainer's accumulators (the part since the last log is
        # this rank's own; it is averaged over ranks at each log).
        steps = self.state.global_step - self._initial_global_step
        self._run_totals().advance(self._total_loss_scalar + float(self._tr_loss), steps)
        super()._save_checkpoint(model, trial)
        distributed.barrier()  # every rank has written its part: the checkpoint is whole
        checkpoint = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        distributed.on_main(write_digest, checkpoint)  # what a resume checks it against (files.checkpoint_damage)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_runtime" in logs and "train_loss" in logs:  # the end of a train() call: report the whole run
            totals, steps = self._run_totals(), self.state.global_step - self._initial_global_step
            totals.advance(logs["train_loss"] * steps, steps, seconds=logs["train_runtime"])
            logs["train_runtime"], logs["train_loss"] = round(totals.seconds, 4), totals.mean_loss
        super().log(logs, start_time)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        if not distributed.is_main():  # Trainer calls this on every rank: not a collective
            return
        write_model_card(Path(self.args.output_dir), self.args, *self._card)


def _model_and_tokenizer(model, args: SFTMixConfig, tokenizer):
    """The model (loaded from its name as `sftmix train` loads it) and its tokenizer with args' chat template."""
    from .model import (
        check_vocabulary,
        load_model,
        load_tokenizer,
        resize_for_tokenizer,
        resolve_model_path,
        set_chat_template,
        set_eos_token,
        training_init_kwargs,
    )

    path = resolve_model_path(model if isinstance(model, str) else args.model_name_or_path) if (
        model is None or isinstance(model, str)) else model.name_or_path
    if tokenizer is None:
        tokenizer = load_tokenizer(path, args.trust_remote_code, args.chat_template_path, args.eos_token,
                                   args.model_revision)
    elif not getattr(tokenizer, "sftmix_prepared", False):  # the caller's own tokenizer: as load_tokenizer does
        if args.chat_template_path is not None:
            set_chat_template(tokenizer, args.chat_template_path)
        set_eos_token(tokenizer, args.eos_token)
    if model is None or isinstance(model, str):
        model = load_model(path, **training_init_kwargs(args))
    resize_for_tokenizer(model, tokenizer)
    check_vocabulary(model, tokenizer, path)
    return model, tokenizer


def _tokenised(dataset, args: SFTMixConfig, tokenizer, max_examples: int | None = None):
    """Rows with `input_ids` and `labels` as they are; a raw dataset (or a path) through `build_dataset`, the one
    data path of the CLI and the API: same tokenisation, assistant-only masking, truncation and ids."""
    from .data import build_dataset

    columns = set(getattr(dataset, "column_names", ()) or ())
    if "input_ids" in columns:
        needed = {"input_ids", "labels"} | ({"id"} if args.loss_type != "ntp" else set())
        if not needed <= columns:
            raise InputError(f"a tokenised dataset needs the columns {sorted(needed)} (labels: -100 where "
                             f"unsupervised; id: to join the confidence split), it has {sorted(columns)}; or pass the "
                             "raw rows (chat messages, Alpaca, prompt/completion, ShareGPT) and sftmix tokenises them")
        return dataset
    built, report = build_dataset(dataset, tokenizer, args.max_length, max_examples, args.dataset_split,
                                  args.truncation)
    logger.warning("Data: %s", report.summary())
    return built


def training_cost(log_history: list[dict]) -> dict[str, float] | None:
    """A finished training's wall time (the whole run, across resumes) and the tokens it processed, from its logs."""
    runtime = [entry["train_runtime"] for entry in log_history if "train_runtime" in entry]
    tokens = [entry["num_tokens"] for entry in log_history if "num_tokens" in entry and "eval_loss" not in entry]
    return {"seconds": float(runtime[-1]), "tokens": int(tokens[-1]) if tokens else None} if runtime else None


def _batch_tokens(inputs: dict) -> int:
    """Input tokens of a batch, padding excluded (TRL's `num_tokens`)."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())  # padding-free: one row, no padding


class _CollatorWithIds:
    """Wraps a collator so that batches also carry `example_ids` (a list, never sent to the model)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator([{k: v for k, v in example.items() if k != "id"} for example in examples])
        batch["example_ids"] = [example["id"] for example in examples]
        return batch


def sequence_index(batch: dict) -> torch.Tensor | None:
    """Each position's sequence number in a padding-free batch (the sequences of the micro-batch concatenated
    in one row, position_ids restarting at 0 for each); None for a padded batch, one sequence per row. -> [1, N]"""
    if "attention_mask" in batch or "position_ids" not in batch:
        return None
    starts = batch["position_ids"] == 0
    return (starts.reshape(-1).cumsum(0) - 1).reshape(starts.shape)


def num_sequences(labels: torch.Tensor, sequence: torch.Tensor | None) -> int:
    return labels.size(0) if sequence is None else int(sequence.max()) + 1


def _shifted(sequence: torch.Tensor | None) -> torch.Tensor | None:
    """The sequence number of each predicted token (aligned with labels[:, 1:])."""
    return None if sequence is None else sequence[:, 1:]


def supervised_per_sequence(labels: torch.Tensor, sequence: torch.Tensor | None) -> torch.Tensor:
    """Supervised (predicted) tokens of each sequence. [B, T] -> [S]"""
    shifted = labels[:, 1:] != IGNORE_INDEX
    if sequence is None:
        return shifted.sum(dim=1)
    return torch.bincount(sequence[:, 1:][shifted], minlength=num_sequences(labels, sequence))


@dataclass
class StepCounts:
    """What one optimisation step's loss terms are normalised by: tokens and mixed positions, all ranks."""

    ntp_tokens: float
    mixed_positions: float
    local_mixed_positions: float  # this rank's, for average_tokens_across_devices=False
    micro_batches: int


def _step_counts(batch_samples: list[dict], mixing: bool, device) -> StepCounts:
    ntp_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batch_samples)
    mixed = 0
    if mixing:
        mixed = sum(_mixed_in_batch(batch) for batch in batch_samples)
    all_tokens, all_mixed = distributed.sum_over_ranks([ntp_tokens, mixed], device)
    return StepCounts(all_tokens, all_mixed, float(mixed), max(len(batch_samples), 1))


def no_step_past_max_steps(checkpoint: str | None, max_steps: int) -> None:
    """Refuse to resume from a checkpoint beyond max_steps; one AT max_steps trains no further step.

    Resumed from the final checkpoint (a finished run run again, or one killed between its last
    checkpoint and the final save), Trainer's loop still takes one optimisation step before it
    checks max_steps; `get_batch_samples` hands it no batch then, so the weights stay those of
    the final step and the final save writes them.
    """
    state_file = Path(checkpoint or "") / "trainer_state.json"
    if checkpoint and max_steps > 0 and state_file.is_file():
        step = json.loads(state_file.read_text()).get("global_step", 0)
        if step > max_steps:
            raise InputError(f"{checkpoint} is at step {step}, past --max_steps {max_steps}: resume with --max_steps "
                             f">= {step}, or train into another --output_dir")


class TrainingDiverged(InputError):
    """The loss became NaN or inf: nothing from this step on is saved."""


def check_finite_loss(step: int, ntp_sum: float, mixup_sum: float, args, training: bool = True) -> None:
    """Stop at the first NaN/inf loss, naming the step (or the evaluation), instead of training (and saving) a
    broken model."""
    if math.isfinite(ntp_sum) and math.isfinite(mixup_sum):
        return
    if not training:  # not a diverged training step: the weights being evaluated give NaN/inf on this set
        raise InputError(
            f"evaluation at step {step} failed: the NTP loss on the evaluation set ({args.eval_dataset_path}) is "
            f"{ntp_sum}: the model overflows on these examples (fp16?) or holds NaN/inf weights. What was saved is "
            "kept (checkpoints; at the final evaluation, the trained model): check it, evaluate in bf16 or float32, "
            "or check the evaluation set."
        )
    term = "NTP" if not math.isfinite(ntp_sum) else "Mixup"
    raise TrainingDiverged(
        f"training diverged at step {step}: the {term} loss is {ntp_sum if term == 'NTP' else mixup_sum} "
        f"(learning_rate {args.learning_rate}, max_grad_norm {args.max_grad_norm}); checkpoints written before "
        "this step are kept. Lower --learning_rate, check the model's weights for NaN/inf, or train in "
        "bf16/float32 instead of fp16."
    )


class RunTotals(TrainerCallback, ExportableState):
    """Training seconds, summed per-step loss and steps of a whole run, stored in every checkpoint.

    Trainer reports `train_runtime` and `train_loss` of its own `train()` call only; after a
    resume that is the part after the checkpoint. The totals up to each checkpoint are saved in
    its trainer_state.json (`stateful_callbacks`), so the final numbers cover the whole run (the
    time of work lost to a kill, after the last checkpoint, is not counted).
    """

    def __init__(self, seconds: float = 0.0, loss_sum: float = 0.0, steps: int = 0):
        self.seconds, self.loss_sum, self.steps = seconds, loss_sum, steps
        self._before, self._started = (seconds, loss_sum, steps), time.time()

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds, "loss_sum": self.loss_sum, "steps": self.steps}, "attributes": {}}

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def restore(self, checkpoint: str | None) -> None:
        """Start from the totals saved with `checkpoint` (zero for a fresh run)."""
        saved = {}
        state_file = os.path.join(checkpoint, "trainer_state.json") if isinstance(checkpoint, str) else None
        if state_file and os.path.isfile(state_file):
            stored = json.loads(Path(state_file).read_text()).get("stateful_callbacks", {}).get(type(self).__name__, {})
            saved = stored.get("args", {}) if isinstance(stored, dict) else {}
        self.__init__(**saved)

    def on_train_begin(self, args, state, control, **kwargs):
        self._before, self._started = (self.seconds, self.loss_sum, self.steps), time.time()

    def advance(self, loss_sum: float, steps: int, seconds: float | None = None) -> None:
        """Totals = the run before this train() call + this call's `loss_sum` over `steps` (and its seconds)."""
        seconds_before, loss_before, steps_before = self._before
        self.seconds = seconds_before + (time.time() - self._started if seconds is None else seconds)
        self.loss_sum, self.steps = loss_before + loss_sum, steps_before + steps


def _mixed_in_batch(batch: dict) -> int:
    labels, sequence = batch["labels"], sequence_index(batch)
    pairs = balanced_pairs(num_sequences(labels, sequence))
    return count_mixed_positions(labels[:, 1:], pairs, _shifted(sequence))


def check_ids_match(dataset_ids: list[str], groups: dict[str, str]) -> int:
    """Every example needs a group; returns how many group entries have no example (they are ignored).

    A confidence file may cover more examples than this dataset keeps: a reference model with
    another tokenizer or max_length (weak-to-strong) drops other examples than the target does.
    """
    data_ids, confidence_ids = set(dataset_ids), set(groups)
    missing, extra = data_ids - confidence_ids, confidence_ids - data_ids
    if missing:
        raise InputError(
            f"confidence file and dataset disagree: {len(missing)} of {len(data_ids)} dataset ids have no "
            f"confidence (e.g. {sorted(missing)[:3]}); ({len(extra)} of {len(confidence_ids)} confidence ids are not "
            "in the dataset: those alone would be ignored). Re-run `sftmix dynamics` on this dataset."
        )
    return len(extra)


