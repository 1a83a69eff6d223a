"""Knowledge distillation from the float model during QAT fine-tuning.

    loss = CTC(student) + weight * mean over valid frames of KL(teacher || student)

The student (the integer QAT model) and its teacher (the float model it was quantized
from) share the architecture and the frame rate, so their CTC posteriors can be matched
frame by frame (frame-level distillation, as in Takashima et al., "An investigation of
a knowledge distillation method for CTC acoustic models", ICASSP 2018). The teacher sees
the same SpecAugmented batch in eval mode and gets no gradient. Padded frames (beyond
each utterance's output length) are left out of the mean.
"""

from __future__ import annotations

import torch
from torch import nn


def frame_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, lengths: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over valid frames of KL(softmax(teacher / T) || softmax(student / T)) * T^2.

    student_logits, teacher_logits: [B, T', V]; lengths: [B] valid frames per utterance.
    """
    t = temperature
    log_p_student = torch.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # [B, T']
    valid = torch.arange(kl.shape[1], device=kl.device)[None, :] < lengths[:, None].to(kl.device)
    return (kl * valid).sum() / valid.sum().clamp(min=1) * (t * t)


class DistillationLoss:
    """Extra loss for `train_loop`: `weight * frame_kl(student, frozen teacher)` on the same batch."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight
        self.temperature = temperature

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor,
                 out_lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits, _ = self.teacher.to(x.device)(x, lengths)
        return self.weight * frame_kl(logits, teacher_logits, out_lengths, self.temperature)
