"""--quantize int8: int8 weights for small batches, the layer's own weights for large ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenwire.engine.hf.quant import MAX_ROWS, DualLinear, quantize_int8


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean() / b.float().abs().mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_small_batches_use_int8_and_stay_close_large_ones_are_exact(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias).to(dtype)
    dual = DualLinear(linear)
    with torch.inference_mode():
        for shape in [(1, 64), (3, 1, 64), (MAX_ROWS, 64)]:
            x = torch.randn(*shape, dtype=dtype)
            out = dual(x)
            assert out.shape == (*shape[:-1], 96) and out.dtype == dtype
            assert not torch.equal(out, linear(x))  # rounded weights: the int8 path ran
            assert relative_error(out, linear(x)) < 0.02
        big = torch.randn(2, MAX_ROWS, 64, dtype=dtype)  # more rows than MAX_ROWS: the layer's own weight
        assert torch.equal(dual(big), linear(big))


def test_quantize_int8_replaces_every_linear_and_keeps_tied_weights_tied() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(50, 32)
    model = nn.ModuleDict({"embed": embed, "mlp": nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))})
    head = nn.Linear(32, 50, bias=False)
    head.weight = embed.weight  # tied, as in SmolLM2
    model["head"] = head
    assert quantize_int8(model) == 3
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert isinstance(model["head"], DualLinear) and model["head"].weight is embed.weight
    x = torch.randn(1, 32)
    with torch.inference_mode():
        assert relative_error(model["head"](x), x @ embed.weight.T) < 0.02
