"""The linear factory: model files ask it for every projection and never branch on quantization."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """Dense linear; weight [out, in] in the model's storage dtype."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return Linear(in_features, out_features, bias=bias)
