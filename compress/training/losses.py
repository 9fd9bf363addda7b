"""DynamicViT's training loss as small pure functions (Rao et al., NeurIPS 2021, the reference's DeiT recipe).

total = CE(student, labels)
      + ratio_weight * mean_k mean_batch( (mean_tokens(decision_k) - rho**k)^2 )
      + distill_weight * KL(teacher || student)          (log-softmax both, batchmean, T = 1)
      + token_distill_weight * MSE(student tokens, teacher tokens) over the last stage's kept tokens

Shapes: logits [batch, classes]; decisions [batch, patches] (hard 0/1, straight-through);
patch tokens [batch, patches, channels].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms after cross-entropy; the defaults are the DeiT recipe's."""

    ratio: float = 2.0
    distill: float = 0.5
    token_distill: float = 0.5


def stage_targets(keep_ratio: float, num_stages: int) -> list[float]:
    """Cumulative keep fraction each stage is driven toward: rho**k, k = 1..num_stages."""
    return [keep_ratio**k for k in range(1, num_stages + 1)]


def keep_ratio_loss(stage_decisions: Sequence[torch.Tensor], keep_ratio: float) -> torch.Tensor:
    """Mean over stages of the batch mean of (fraction of patch tokens kept - rho**k)^2."""
    targets = stage_targets(keep_ratio, len(stage_decisions))
    terms = [(decision.mean(dim=1) - target).pow(2).mean() for decision, target in zip(stage_decisions, targets)]
    return torch.stack(terms).mean()


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at temperature 1, summed over classes and averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def token_distillation_loss(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, keep_decision: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between final patch tokens, over the tokens the last stage kept.

    The mean runs over kept tokens and channels (the reference's MSE over the selected tokens);
    a batch where nothing is kept gives zero rather than NaN.
    """
    keep = keep_decision.detach().to(student_tokens.dtype).unsqueeze(-1)  # [B, N, 1]
    squared = (student_tokens - teacher_tokens.detach()).pow(2) * keep
    count = keep.sum() * student_tokens.shape[-1]
    return squared.sum() / count.clamp(min=1.0)


def dynamicvit_loss(
    output,
    teacher_logits: torch.Tensor,
    teacher_tokens: torch.Tensor,
    labels: torch.Tensor,
    keep_ratio: float,
    weights: LossWeights = LossWeights(),
    classification_loss=F.cross_entropy,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The full loss of a ``MaskedForwardOutput``; returns (total, the unweighted terms for logging).

    labels may be class indices [batch] or soft targets [batch, classes] (mixup), as long as
    ``classification_loss`` accepts them.
    """
    terms = {
        "cls": classification_loss(output.logits.float(), labels),
        "ratio": keep_ratio_loss(output.stage_decisions, keep_ratio),
        "kl": logit_distillation_loss(output.logits, teacher_logits),
        "token_mse": token_distillation_loss(output.patch_tokens.float(), teacher_tokens.float(), output.last_decision),
    }
    total = (
        terms["cls"]
        + weights.ratio * terms["ratio"]
        + weights.distill * terms["kl"]
        + weights.token_distill * terms["token_mse"]
    )
    return total, {name: float(value.detach()) for name, value in terms.items()}
