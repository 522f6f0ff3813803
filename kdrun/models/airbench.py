"""airbench's CIFAR-10 network (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024; airbench94).

A fixed whitening layer and a GELU, then three blocks of conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU, a
global max-pool and a bias-free linear classifier whose output is scaled by ``logit_scale`` (1/9):

- the first layer is a 2x2 convolution whose weights are the patch-whitening transform of the training images
  (the eigenvectors of the 2x2-patch covariance scaled by 1/sqrt(eigenvalue + eps), and their negatives). They are
  computed from the data before training (:meth:`AirbenchNet.init_from_data`, which kdrun calls with 5,000
  images evenly spaced through the split a model trains on, ``kdrun.stages.DATA_INIT``) and stay frozen; the
  layer's bias trains (airbench freezes it after 3 epochs);
- the BatchNorm layers have no trainable scale (fixed at 1; their shift trains), momentum 0.6 in airbench's
  convention (``momentum=0.4`` in PyTorch's) and eps 1e-12;
- each 3x3 convolution starts as the identity on its first ``in_channels`` outputs (``nn.init.dirac_``).

airbench's training recipe (Nesterov SGD with a 64x learning rate on the BN shifts, lookahead, label smoothing,
alternating flips) is its own; kdrun trains this network with its usual optimiser and schedule. ``widths=[64,
256, 256]`` is airbench94's network: 2.0M parameters, 0.12 G multiply-adds at 32x32. On other image sizes the
final pool is global (airbench's 3x3 max-pool is the global pool of its 3x3 map), and a block whose map is down to
one pixel (images under 16x16, e.g. the 8x8 digits) skips its max-pool.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.registry import register_model


class Conv(nn.Conv2d):
    """A bias-free 3x3 'same' convolution that starts as the identity on its first ``in_channels`` outputs."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[: min(cin, cout)])


def batch_norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)  # a fixed scale of 1: the next layer's scale-invariance does the rest
    return bn


class ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int, pool: bool):
        pooling = nn.MaxPool2d(2) if pool else nn.Identity()
        super().__init__(
            Conv(cin, cout), pooling, batch_norm(cout), nn.GELU(), Conv(cout, cout), batch_norm(cout), nn.GELU()
        )


class AirbenchNet(nn.Module):
    def __init__(
        self, widths: list[int], num_classes: int, in_chans: int, img_size: int, logit_scale: float, whiten_eps: float
    ):
        super().__init__()
        k = 2
        self.whiten = nn.Conv2d(in_chans, 2 * in_chans * k * k, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data (init_from_data), then fixed
        assert self.whiten.bias is not None
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        side, pools = img_size - k + 1, []  # a block's 2x2 max-pool only where its map has 2 pixels or more
        for _ in range(3):
            pools.append(side >= 2)
            side = side // 2 if side >= 2 else side
        self.block1 = ConvGroup(self.whiten.out_channels, widths[0], pools[0])
        self.block2 = ConvGroup(widths[0], widths[1], pools[1])
        self.block3 = ConvGroup(widths[1], widths[2], pools[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale, self.whiten_eps = logit_scale, whiten_eps
        self.feature_points = {
            "stem": "act",
            "stage1": "block1",
            "stage2": "block2",
            "stage3": "block3",
            "pre_logits": "fc:input",
        }

    @torch.no_grad()
    def init_from_data(self, batches: Iterable[torch.Tensor]) -> None:
        """Set the whitening layer from the images of ``batches`` (normalised, ``[B, C, H, W]`` each): each output
        channel is an eigenvector ``v`` of the second-moment matrix of the images' 2x2 patches (uncentred, as
        airbench's) scaled by ``1/sqrt(lambda + eps)``, largest eigenvalue first, then the same negated (so the
        GELU after it keeps both signs). The moments are summed a few images at a time, in float64."""
        w = self.whiten.weight
        c, kh, kw = w.shape[1:]
        moments = torch.zeros(c * kh * kw, c * kh * kw, dtype=torch.float64, device=w.device)
        count = 0
        for batch in batches:
            per_image = (batch.shape[-2] - kh + 1) * (batch.shape[-1] - kw + 1)
            for images in batch.split(max(1, 2**20 // per_image)):  # about a million patches at a time
                patches = images.to(w.device, torch.float64).unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
                flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)  # as the weights: C, kh, kw
                moments += flat.T @ flat
                count += flat.shape[0]
        if not count:
            raise ValueError("init_from_data: no images")
        eigenvalues, eigenvectors = torch.linalg.eigh(moments / count)  # ascending
        order = eigenvalues.argsort(descending=True)
        scaled = eigenvectors[:, order].T / torch.sqrt(eigenvalues[order].clamp_min(0) + self.whiten_eps)[:, None]
        scaled = scaled.reshape(-1, c, kh, kw).to(w.dtype)
        w.copy_(torch.cat([scaled, -scaled]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.act(self.whiten(x)))))
        return self.fc(self.pool(x).flatten(1)) * self.logit_scale


@register_model("airbench")
def airbench(
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    widths: list[int] | tuple[int, ...] = (64, 256, 256),
    logit_scale: float = 1 / 9,
    whiten_eps: float = 5e-4,
):
    """airbench94's network; ``widths``: the channels of its three blocks ([64, 256, 256] in airbench94),
    ``logit_scale``: the classifier's output scale (1/9), ``whiten_eps``: added to the patch covariance's
    eigenvalues before the whitening layer divides by their square roots (5e-4)."""
    widths = list(widths)
    if len(widths) != 3 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"kwargs.widths={widths}: must be three positive channel counts, e.g. [64, 256, 256]")
    if logit_scale <= 0:
        raise ConfigError(f"kwargs.logit_scale={logit_scale}: must be > 0")
    if whiten_eps <= 0:
        raise ConfigError(f"kwargs.whiten_eps={whiten_eps}: must be > 0")
    if img_size < 2:
        raise ConfigError(
            f"images of {img_size}x{img_size}: airbench needs at least 2x2 (its 2x2 whitening convolution)"
        )
    return AirbenchNet(widths, num_classes, in_chans, img_size, logit_scale, whiten_eps)


airbench.sets_from_data = True  # type: ignore[attr-defined]  # a teacher's store key records how (stages.DATA_INIT)
