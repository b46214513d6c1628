"""The FID Inception-v3 (the 2015 TensorFlow graph behind FID, sFID and IS), written from its architecture.

Parameter names follow ``pt_inception-2015-12-05-6726825d.pth`` (the public port pytorch-fid and
torch-fidelity load; ECOSYSTEM.md 1.5): ``<layer>.conv.weight`` and ``<layer>.bn.{weight, bias,
running_mean, running_var}`` for 94 conv layers (no ``num_batches_tracked``), ``fc.weight`` [1008 x 2048]
and ``fc.bias``. Every conv layer is conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU.
The FID variant differs from the classification Inception-v3 in its pooling branches: average pools
exclude the padding, and the last block (``Mixed_7c``) max-pools.

Forward: uint8-range images [N x 3 x H x W] float -> TF1 bilinear resize to 299 x 299 -> (x - 128) / 128
-> the network. Three taps (what the ADM evaluator reads from the TF graph):

* ``pool``    [N x 2048]: ``pool_3``, the global average of ``Mixed_7c``;
* ``spatial`` [N x 2023]: ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` after BN and ReLU, its first 7
  channels as NHWC, flattened (17 * 17 * 7);
* ``logits``  [N x 1008]: ``pool @ fc.weight^T``, without the bias (the evaluator's softmax graph).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


def resize_bilinear_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)`` of float32 [N x C x H x W].

    Output pixel i reads the source coordinate ``s = i * (in / out)`` (float32, no half-pixel offset),
    rows ``floor(s)`` and ``min(floor(s) + 1, in - 1)`` with weight ``s - floor(s)``; interpolated along
    x first (top and bottom rows), then along y: ``top + (bottom - top) * wy`` (float32, op by op)."""
    assert images.ndim == 4 and images.dtype == torch.float32, (images.shape, images.dtype)

    def axis(length: int):
        scale = torch.tensor(length, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        source = torch.arange(size, dtype=torch.float32) * scale
        lower = torch.floor(source)
        weight = (source - lower).to(images.device)
        lower = lower.long().clamp(max=length - 1)
        upper = (lower + 1).clamp(max=length - 1)
        return lower.to(images.device), upper.to(images.device), weight

    top_row, bottom_row, wy = axis(images.shape[2])
    left, right, wx = axis(images.shape[3])
    top, bottom = images[:, :, top_row], images[:, :, bottom_row]
    top = top[..., left] + (top[..., right] - top[..., left]) * wx
    bottom = bottom[..., left] + (bottom[..., right] - bottom[..., left]) * wx
    return top + (bottom - top) * wy[:, None]


class FrozenBatchNorm(nn.Module):
    """Batch norm with running statistics only: (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """conv (no bias) -> frozen batch norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Block(nn.Module):
    """An Inception block: ``branches`` returns the branch outputs in concat order; forward concatenates."""

    def branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class BlockA(Block):
    """35 x 35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (``pool_features`` wide)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def branches(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg_pool(x))]


class BlockB(Block):
    """35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def branches(self, x):
        return [self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2)]


class BlockC(Block):
    """17 x 17 with factorised 7x7 convolutions (``c7`` inner width): 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def branches(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return [self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), double,
                self.branch_pool(_avg_pool(x))]


class BlockD(Block):
    """17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def branches(self, x):
        tower = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return [self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(tower), F.max_pool2d(x, 3, stride=2)]


class BlockE(Block):
    """8 x 8 with split 1x3 / 3x1 heads: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    ``max_pool``: the last block of the FID graph max-pools; the one before average-pools."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def branches(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return [self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled)]


class FIDInception(nn.Module):
    """The FID Inception-v3; ``forward(images)`` -> dict ``pool``, ``spatial``, ``logits`` (module docstring)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images: float32 [N x 3 x H x W] in [0, 255], any H, W."""
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        x = (resize_bilinear_tf1(images) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        x = torch.cat(branches, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        logits = pool @ self.fc.weight.T
        return {"pool": pool, "spatial": spatial, "logits": logits}
