"""Weight-only int8 for the small batches of a CPU decode step (``--quantize int8``).

A decode step with few running sequences multiplies a handful of rows by every weight matrix, so its time goes
to reading weights: bfloat16 matrix-vector products reach ~20 GB/s on the development CPU. Int8 weights with one
scale per output channel halve the bytes and run on PyTorch's int8 kernel (``aten._weight_int8pack_mm``):
measured on a 576 x 1536 layer, 4.2x faster than bfloat16 for one row, 1.45x for 8, even at 16 and slower at 32,
where bfloat16 with AMX wins. So each linear layer keeps both: the int8 copy for at most ``max_rows`` rows (decode
steps of small batches) and its own weight for more (prefill chunks, large batches). The cost is one more byte
per weight, and int8 rounding of the small-batch results (about 0.7% relative error per product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8  # from bench: above ~8 rows the int8 kernel stops paying


class DualLinear(nn.Module):
    """A linear layer that multiplies small batches by an int8 copy of its weight and larger ones by the weight."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_ROWS) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.max_rows = max_rows
        self.weight = linear.weight  # shared, not copied: tied embeddings stay tied
        self.bias = linear.bias
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), False)
        self.register_buffer("scales", scales.to(linear.weight.dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or x.dtype != self.scales.dtype:
            return F.linear(x, self.weight, self.bias)
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(
            x.reshape(rows, self.in_features), self.qweight, self.scales
        )
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


def quantize_int8(model: nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Give every ``nn.Linear`` of ``model`` (the output head included) an int8 copy for small batches, in place;
    returns how many layers got one."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, DualLinear(linear, max_rows))
    return len(targets)
