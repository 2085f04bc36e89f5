"""Proximal (feedforward) learning: a layer-local contrastive predictive loss.

A layer's *code* of its input at step t is the k winners' scores (the others zero). Through a
bilinear predictor W, the code at t scores the code at every step of the same stream; the
step `ahead` on is the right answer (InfoNCE: CPC, van den Oord et al. 2018; one loss per
layer, as in Greedy InfoMax, Loewe et al. 2019, and CLAPP, Illing et al. 2021). The other
steps of the same stream are the negatives, so what every step of a stream shares (a voice,
a microphone) cannot tell them apart: the map learns what changes over time. The layer's
input is detached and no step looks further back than `ahead`: the gradient stays in the
layer's feedforward map and its predictor.
"""

import torch
import torch.nn.functional as F


def contrastive_predictive_loss(
    code: torch.Tensor, predictor: torch.Tensor, ahead: int, reset: torch.Tensor | None = None
) -> torch.Tensor:
    """code: (B, T, C); predictor: (C, C); reset: (B, T) bool, a new sequence starts at step t.

    The mean over anchors t < T - ahead of -log softmax_s(code[t] W code[s]^T) at s = t + ahead,
    s over the T steps of the anchor's stream. An anchor with a reset in (t, t + ahead] has no
    true successor in the chunk and is left out; zero (with a gradient) when none is left.
    """
    b, t, _ = code.shape
    if t <= ahead:
        return code.sum() * 0.0
    logits = (code[:, :-ahead] @ predictor) @ code.transpose(1, 2)  # (B, T - ahead, T)
    target = torch.arange(ahead, t, device=code.device).expand(b, -1)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(b, -1)
    if reset is None:
        return loss.mean()
    # Resets among steps t+1 .. t+ahead, by a cumulative count along time.
    count = F.pad(reset.long().cumsum(1), (1, 0))
    valid = ((count[:, ahead + 1:] - count[:, 1:t - ahead + 1]) == 0).to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp(min=1.0)
