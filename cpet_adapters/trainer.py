"""``CPETTrainer``: the CPET loss in a transformers ``Trainer``, for code built around one.

``cpet_adapters.train`` is the reference loop; this subclass computes the same loss per
micro-batch: the summed next-token cross-entropy divided by the learned tokens of the whole
accumulation window (``num_items_in_batch``, which the Trainer counts across the window and, with
``average_tokens_across_devices``, across processes), plus ``distill`` times the hidden-state MSE
and ``distill_kl`` times the logit KL against a frozen teacher, each divided by the window's
micro-batches. It tells the Trainer the loss is already scaled for gradient accumulation.

Example:
    >>> trainer = CPETTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
    ...                       data_collator=collator, teacher=teacher, distill=1.0)
    >>> trainer.train()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .train import hidden_mse, logit_kl, token_cross_entropy


class CPETTrainer(Trainer):
    """A ``Trainer`` whose loss is CPET's (see the module docstring).

    Args:
        teacher: the frozen original model (with the inherited LoRA); None without distillation.
        distill: weight of the hidden-state MSE.
        distill_layers: the hidden states compared (indices into ``hidden_states``).
        distill_kl: weight of the logit KL.
        temperature: temperature of the logit KL.
        *args, **kwargs: ``transformers.Trainer``'s.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, distill: float = 0.0,
                 distill_layers: tuple[int, ...] = (-1,), distill_kl: float = 0.0, temperature: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill = float(distill)
        self.distill_layers = tuple(distill_layers)
        self.distill_kl = float(distill_kl)
        self.temperature = float(temperature)
        self.loss_is_scaled_for_ga = True
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
            teacher.to(self.args.device)
        #: the last micro-batch's parts of the loss, for logging
        self.last_parts: dict[str, float] = {}

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        need_hidden = self.teacher is not None and self.distill > 0
        out = model(**forward, output_hidden_states=need_hidden)
        ce_sum, n = token_cross_entropy(out.logits, labels)
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        if num_items_in_batch is not None:
            loss = ce_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = ce_sum / max(n, 1) / steps
        self.last_parts = {"ce": float(loss.detach())}
        if self.teacher is not None and (self.distill or self.distill_kl):
            with torch.no_grad():
                t = self.teacher(**forward, output_hidden_states=need_hidden)
            mask = forward["attention_mask"]
            if self.distill:
                mse = hidden_mse(out.hidden_states, t.hidden_states, self.distill_layers, mask) / steps
                loss = loss + self.distill * mse
                self.last_parts["mse"] = float(mse.detach())
            if self.distill_kl:
                kl = logit_kl(out.logits, t.logits, mask, self.temperature) / steps
                loss = loss + self.distill_kl * kl
                self.last_parts["kl"] = float(kl.detach())
        return (loss, out) if return_outputs else loss
