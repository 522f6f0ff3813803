"""Factor transfer: Kim, Park & Kwak (NeurIPS 2018),
"Paraphrasing Complex Network: Network Compression via Factor Transfer".

Two stages. First a paraphraser P (a convolutional auto-encoder on the teacher's last-stage map
t, [C_t, H, W] -> k*C_t factors -> [C_t, H, W]) is trained to reconstruct t:

    paraphraser stage:  mean over elements of (P.decode(P.encode(t)) - t)^2       (teacher frozen)

then the student's map s goes through a trainable translator T (to k*C_t channels) and its
factor is matched to the frozen paraphraser's factor of the teacher:

    factor(f) = normalize(vec(mean_c f_c^2))            (per sample, L2; as attention transfer)
    ft = weight * mean over (batch, positions) of |factor(T(s)) - factor(P.encode(t))|

(the larger of T(s), P.encode(t) average-pooled to the smaller's H x W first). Paraphraser: three 3x3 convs
(C_t, C_t, k*C_t) + LeakyReLU(0.1) and three 3x3 transposed convs back, no BatchNorm; translator:
three 3x3 convs (C_s, k*C_t, k*C_t) + BatchNorm + LeakyReLU(0.1). RepDistiller defaults (the
CRD benchmark): k 0.5, weight 200 (``-b 200``), CE weight 1, the last stage (``feat[-2]``); the
paraphraser trains for 30 epochs with SGD at a constant LR of 0.01 (momentum and weight decay
of ``optim``; ``paraphraser_lr``). RepDistiller uses 0.01 for ResNet and WRN students and the student's own LR
for the others (0.05 for its VGG8 and ResNet50 tables): set ``loss.paraphraser_lr`` to match those. The
paraphraser stage is the run's stage ``student_paraphraser`` (checkpointed, resumable); it is trained once per run.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.losses.adapters import pool_to_smaller
from kdrun.losses.base import FeatureLoss, PreStage, check, register_loss
from kdrun.models.features import FeatureTap


def _conv_block(c_in: int, c_out: int, transposed: bool = False, bn: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, 3, 1, 1)
    return [conv, *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """The teacher-side auto-encoder: ``encoder`` gives the factors, ``decoder`` reconstructs the map."""

    def __init__(self, c_t: int, k: float):
        super().__init__()
        c_f = int(c_t * k)
        self.encoder = nn.Sequential(*_conv_block(c_t, c_t), *_conv_block(c_t, c_f), *_conv_block(c_f, c_f))
        self.decoder = nn.Sequential(
            *_conv_block(c_f, c_f, True), *_conv_block(c_f, c_t, True), *_conv_block(c_t, c_t, True)
        )

    def forward(self, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f_t)
        return factor, self.decoder(factor)


def translator(c_s: int, c_t: int, k: float) -> nn.Sequential:
    """The student-side encoder to the paraphraser's factor width (with BatchNorm)."""
    c_f = int(c_t * k)
    return nn.Sequential(
        *_conv_block(c_s, c_s, bn=True), *_conv_block(c_s, c_f, bn=True), *_conv_block(c_f, c_f, bn=True)
    )


def factor(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


class ParaphraserObjective:
    """The paraphraser stage's objective: reconstruct the frozen teacher's feature map (MSE)."""

    def __init__(self, teacher: nn.Module, layer: str, paraphraser: Paraphraser):
        self.teacher, self.layer, self.paraphraser = teacher, layer, paraphraser
        self.tap = FeatureTap(teacher, [layer])

    def __enter__(self) -> Self:
        self.paraphraser.requires_grad_(True)
        self.tap.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.tap.close()
        self.paraphraser.requires_grad_(False)  # the student stage reads it, frozen

    def __call__(self, net: nn.Module, batch, epoch: int) -> dict[str, torch.Tensor]:
        self.teacher.eval()
        with torch.no_grad():
            self.teacher(batch.x)
        f_t = self.tap.features[self.layer].float()
        _, rec = net(f_t)
        return {"paraphraser": F.mse_loss(rec, f_t)}


@register_loss("ft")
class FT(FeatureLoss):
    fixed_when_built = ("k", "paraphraser_epochs", "paraphraser_lr")
    max_pairs = 1

    def __init__(
        self, weight: float = 200.0, k: float = 0.5, paraphraser_epochs: int = 30, paraphraser_lr: float = 0.01, **kw
    ):
        super().__init__(weight=weight, **kw)
        check("k", k, 0 < k <= 1, "a number in (0, 1]")
        check(
            "paraphraser_epochs",
            paraphraser_epochs,
            int(paraphraser_epochs) == paraphraser_epochs and paraphraser_epochs >= 1,
            "an integer >= 1 (0 leaves the paraphraser untrained: its factors would be those of random weights)",
        )
        check("paraphraser_lr", paraphraser_lr, paraphraser_lr > 0, "a number > 0")
        self.k, self.paraphraser_epochs, self.paraphraser_lr = k, int(paraphraser_epochs), paraphraser_lr
        self.paraphraser: Paraphraser | nn.Identity = nn.Identity()  # the Paraphraser once build knows the shapes

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "factor transfer needs two feature maps [C,H,W]")
        if int(t_shape[1] * self.k) < 1:
            raise self.shape_error(i, t_shape, s_shape, f"k={self.k} leaves no factor channel")
        self.paraphraser = Paraphraser(t_shape[1], self.k)
        return translator(s_shape[1], t_shape[1], self.k)

    def _built(self) -> Paraphraser:
        assert isinstance(self.paraphraser, Paraphraser), "build() makes the paraphraser"
        return self.paraphraser

    def pre_stages(self, teacher: nn.Module, student: nn.Module) -> list[PreStage]:
        return [
            PreStage(
                "paraphraser",
                self.paraphraser,
                ParaphraserObjective(teacher, self.teacher_layers[0], self._built()),
                self.paraphraser_epochs,
                {"lr": self.paraphraser_lr, "schedule": "constant", "warmup_epochs": 0},
                lr_key="loss.paraphraser_lr",
            )
        ]

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        with torch.no_grad():
            factor_t = self._built().encoder(f_t)
        factor_s, factor_t = pool_to_smaller(self.adapters[i](f_s), factor_t)  # each at its own size, then pooled
        return (factor(factor_s) - factor(factor_t)).abs().mean()
