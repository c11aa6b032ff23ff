"""The SFTMix loss inside the model's forward: `model(..., sftmix=SFTMixRequest(...))` computes it from the final
hidden states where FSDP / ZeRO-3 have gathered the LM head (as TRL's fused LM head does); other calls are
unchanged."""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .losses import LossTerms, sftmix_loss_fused, sftmix_loss_reference
from .model import head_is_linear


@dataclass
class SFTMixRequest:
    """What the patched forward needs to compute the loss from the final hidden states."""

    labels: torch.Tensor  # [B, T] unshifted, -100 where unsupervised
    pair_index: torch.Tensor | None  # [P, 2] (confident row, unconfident row)
    lam: torch.Tensor | None  # [P]
    ntp_scale: float
    mixup_scale: float
    fused: bool = True
    router_aux: bool = False  # MoE: also return the router load-balancing loss
    sequence: torch.Tensor | None = None  # [B, T] sequence number of each position (padding-free); None: rows


@dataclass
class SFTMixOutput(ModelOutput):
    loss: torch.Tensor | None = None
    ntp_sum: torch.Tensor | None = None
    ntp_count: int | None = None
    row_nll: torch.Tensor | None = None
    mixup_sum: torch.Tensor | None = None
    mixup_count: int | None = None
    entropy_sum: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # unweighted, as MoE models return it


def add_sftmix_head(model) -> None:
    """Let `model(..., sftmix=SFTMixRequest(...))` return the SFTMix loss; other calls are unchanged."""
    original_forward = model.forward
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    # Mixing logits equals mixing states only for a plain linear head; otherwise fall back to the reference.
    linear_head = head_is_linear(model)

    @functools.wraps(type(model).forward)
    def forward(self, *args, sftmix: SFTMixRequest | None = None, **kwargs):
        if sftmix is None:
            return original_forward(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs["use_cache"] = False
        if sftmix.router_aux:
            kwargs["output_router_logits"] = True
        base_outputs = self.base_model(*args, **kwargs)
        hidden = base_outputs.last_hidden_state  # [B, T, D]
        lm_head = self.get_output_embeddings()
        with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
            terms = _loss_terms(hidden.to(lm_head.weight.device), lm_head, sftmix, linear_head, softcap)
        aux_loss = router_aux_loss(self, base_outputs, kwargs.get("attention_mask")) if sftmix.router_aux else None
        return SFTMixOutput(
            loss=terms.total, ntp_sum=terms.ntp_sum, ntp_count=terms.ntp_count, row_nll=terms.row_nll,
            mixup_sum=terms.mixup_sum, mixup_count=terms.mixup_count, entropy_sum=terms.entropy_sum,
            num_correct=terms.num_correct, aux_loss=aux_loss,
        )

    model.forward = types.MethodType(forward, model)


def router_aux_loss(model, base_outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The router load-balancing loss that the MoE model's own forward adds (Mixtral, Qwen2-MoE, ...).

    Our forward calls the base model and drops the head's forward, so it computes the same term,
    with the same function of the model's module, from the router logits the base model returns.
    """
    balancing = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    if balancing is None:
        raise NotImplementedError(f"{type(model).__name__}: no load_balancing_loss_func in its module; "
                                  "set --router_aux_loss_coef 0 to train without the router auxiliary loss")
    return balancing(base_outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def _loss_terms(hidden, lm_head, request: SFTMixRequest, linear_head: bool, softcap) -> LossTerms:
    labels = request.labels.to(hidden.device)
    weight = lm_head.weight
    if isinstance(weight, DTensor):  # FSDP2 shards the head; the tiles need all of it (as TRL's fused head does)
        weight = weight.full_tensor()
    common = (hidden, labels, weight, request.pair_index, request.lam, request.ntp_scale, request.mixup_scale)
    sequence = None if request.sequence is None else request.sequence.to(hidden.device)
    if request.fused and linear_head:
        return sftmix_loss_fused(*common, sequence=sequence)

    def head(states: torch.Tensor) -> torch.Tensor:
        logits = lm_head(states)
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    return sftmix_loss_reference(*common, head=head, sequence=sequence)
