"""BatchNorm whose training statistics cover the global batch (SimCLR's ``global_bn``).

On CUDA the layer is ``torch.nn.SyncBatchNorm`` (its fused statistics and backward kernels).
SyncBatchNorm refuses CPU tensors, so elsewhere (CPU + gloo) the statistics are synchronised
with the autograd-aware gather of ``train.gather``: one collective per layer. Both compute
BatchNorm over the global batch; the 2-rank CPU tests check the second against one process.
"""

from __future__ import annotations

import torch
from torch import nn

from train.gather import all_gather_with_grad, world


class GlobalBatchNorm(nn.SyncBatchNorm):
    """``nn.BatchNormNd`` (any N) with mean and variance over the batches of all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return super().forward(x)  # SyncBatchNorm's fused kernels
        if not self.training or world()[1] == 1:
            return nn.modules.batchnorm._BatchNorm.forward(self, x)
        reduce_dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.float(), dim=reduce_dims, unbiased=False)  # (C,), (C,)
        local = torch.stack([mean, var, torch.full_like(mean, count)])  # (3, C)
        stats = all_gather_with_grad(local[None])  # (world, 3, C)
        counts = stats[:, 2, 0].detach()  # (world,)
        # Combine per-rank moments (Chan et al.): stable, unlike E[x^2] - E[x]^2.
        weights = (counts / counts.sum())[:, None]  # (world, 1)
        global_mean = (weights * stats[:, 0]).sum(0)
        global_var = (weights * (stats[:, 1] + (stats[:, 0] - global_mean) ** 2)).sum(0)
        if self.track_running_stats:
            self._update_running_stats(global_mean, global_var, counts.sum())
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x.float() - global_mean.view(shape)) * torch.rsqrt(global_var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.BatchNormNd`` in ``module`` (in place) by a GlobalBatchNorm.

    BatchNorm subclasses with extra behaviour (timm's ``BatchNormAct2d`` fuses the activation)
    cannot be converted faithfully, so they raise instead of silently losing that behaviour.
    """
    for name, child in module.named_children():
        if type(child) in _PLAIN:
            synced = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            raise ValueError(
                f"cannot synchronise {type(child).__name__} at {name!r}: only plain nn.BatchNormNd layers "
                "convert; pick a backbone built with them or set model.sync_bn=false"
            )
        else:
            convert_global_batchnorm(child)
    return module
