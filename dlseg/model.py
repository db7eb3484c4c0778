"""U-Net (Ronneberger et al. 2015) as small named parts, laid out like milesial/Pytorch-UNet's ``unet_parts.py``.

``same`` padding everywhere, and each decoder step pads the upsampled map to its skip's size, so the output has the
input's height and width for any size of at least ``2**depth``. ``num_classes == 1`` means one logit (binary,
sigmoid); otherwise K logits (softmax over the classes, background included).

    model = build_model({"name": "unet", "in_channels": 1, "num_classes": 1, "base_width": 64, "depth": 4,
                         "bilinear": True})

Full width (base 64, depth 4): 31.0 M parameters with transposed-conv upsampling, 17.3 M with bilinear upsampling
(the same counts as Pytorch-UNet; tests/test_model.py checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlseg.config import option

ARCH_NAMES = ("unet",)
ARCH_KEYS = ("name", "in_channels", "num_classes", "base_width", "depth", "bilinear")


class DoubleConv(nn.Module):
    """(3x3 conv 'same' → BatchNorm → ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv (one encoder step: half the size)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upsample ×2 (bilinear or transposed conv), pad to the skip's size, concatenate the skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = pad_to(self.up(x), skip.shape[-2:])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to one logit per class."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pad_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``x`` symmetrically (extra pixel bottom/right) to height/width ``size`` (odd sizes after pooling)."""
    dy, dx = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dy == 0 and dx == 0:
        return x
    return F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


class UNet(nn.Module):
    """Encoder of ``depth`` Down steps from ``base_width`` channels (doubling), mirrored decoder with skips, 1x1 head."""

    def __init__(self, in_channels: int, num_classes: int, base_width: int = 64, depth: int = 4, bilinear: bool = True):
        super().__init__()
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        factor = 2 if bilinear else 1  # bilinear upsampling keeps channels, so the bottleneck is halved instead
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            Down(widths[i - 1], widths[i] // factor if i == depth else widths[i]) for i in range(1, depth + 1)
        )
        self.ups = nn.ModuleList(
            Up(widths[i], widths[i - 1] // factor if i > 1 else widths[0], bilinear) for i in range(depth, 0, -1)
        )
        self.outc = OutConv(widths[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_size = 2**self.depth
        if x.shape[-2] < min_size or x.shape[-1] < min_size:
            raise ValueError(f"U-Net of depth {self.depth} needs inputs of at least {min_size}x{min_size}, "
                             f"got {tuple(x.shape[-2:])}")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


@dataclass
class ModelConfig:
    """The model section of the training config (input channels and classes come from the data)."""

    name: str = option("architecture (unet)", "unet")
    base_width: int = option("channels of the first level, doubled at each level down", 64)
    depth: int = option("down-sampling steps (inputs at least 2**depth pixels wide)", 4)
    bilinear: bool = option("bilinear upsampling (else transposed convolutions)", True)
    channels_last: bool = option("channels-last memory format for model and inputs (not part of the architecture)",
                                 False)


def arch_dict(cfg: ModelConfig, in_channels: int, num_classes: int) -> dict[str, Any]:
    """The architecture description stored in ``model.json`` and passed to :func:`build_model`."""
    return {"name": cfg.name, "in_channels": int(in_channels), "num_classes": int(num_classes),
            "base_width": int(cfg.base_width), "depth": int(cfg.depth), "bilinear": bool(cfg.bilinear)}


def _positive_int(arch: dict[str, Any], key: str) -> int:
    """``arch[key]`` as an int ≥ 1, else ValueError naming the key."""
    value = arch[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"arch.{key}: expected a positive integer, got {value!r}")
    return value


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Build the network an architecture dict describes; ValueError naming the key when it cannot."""
    if not isinstance(arch, dict):
        raise ValueError(f"arch: expected a mapping, got {type(arch).__name__}")
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"arch: unknown key(s) {', '.join(unknown)} (known: {', '.join(ARCH_KEYS)})")
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"arch: missing key(s) {', '.join(missing)}")
    if arch["name"] not in ARCH_NAMES:
        raise ValueError(f"arch.name: unknown architecture {arch['name']!r} (known: {', '.join(ARCH_NAMES)})")
    if not isinstance(arch["bilinear"], bool):
        raise ValueError(f"arch.bilinear: expected true/false, got {arch['bilinear']!r}")
    in_channels, num_classes, base_width, depth = (
        _positive_int(arch, k) for k in ("in_channels", "num_classes", "base_width", "depth"))
    if depth > 8:
        raise ValueError(f"arch.depth: {depth} is too deep (at most 8)")
    return UNet(in_channels, num_classes, base_width=base_width, depth=depth, bilinear=arch["bilinear"])
