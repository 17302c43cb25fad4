"""The packed scorer's int8 products (templar.serving.int8_linear): the W8A8 scheme computed exactly as stated, its
error against the float product, and the property the packed scorer relies on: a token's result does not depend on
the rows packed beside it, in blocks or not, compiled or not. The served path's agreement is in
tests/test_cpu_precision.py."""

from __future__ import annotations

import torch

from templar.serving.int8_linear import INT8_MAX, ROW_BLOCK, Int8Linear, quantize_linears, quantize_rows


def _linear(inputs: int, outputs: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs, bias=bias)


def test_the_product_is_the_stated_scheme_computed_exactly():
    """int8 weight per output channel, int8 activations per row, an exact integer product, then the two scales."""
    linear = _linear(96, 40)
    x = torch.randn(7, 96) * torch.linspace(0.1, 30, 7)[:, None]  # rows of very different magnitudes
    int8 = Int8Linear(linear)
    w_scale = linear.weight.abs().amax(dim=1) / INT8_MAX
    w_q = torch.round(linear.weight / w_scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    x_scale = x.abs().amax(dim=1, keepdim=True) / INT8_MAX
    x_q = torch.round(x / x_scale).clamp(-INT8_MAX, INT8_MAX)
    expected = (x_q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double() + linear.bias.double()
    with torch.no_grad():
        assert int8.weight_t.dtype == torch.int8 and int8.weight_t.shape == (96, 40)
        assert torch.equal(int8.weight_t.t().float(), w_q)
        torch.testing.assert_close(int8(x).double(), expected, rtol=1e-6, atol=1e-6)
        # against the float product: the two roundings' error, a percent or two of the outputs' scale
        reference = linear(x)
        error = (int8(x) - reference).abs().amax(dim=1) / reference.abs().amax(dim=1)
        assert error.max() < 0.03, error


def test_a_row_is_quantized_on_its_own_and_zero_rows_stay_zero():
    q, scale = quantize_rows(torch.tensor([[0.0, 0.0], [1.0, -2.0]]))
    assert q.dtype == torch.int8 and q.tolist() == [[0, 0], [64, -127]]
    assert torch.isfinite(scale).all()
    with torch.no_grad():
        assert torch.equal(Int8Linear(_linear(2, 3, bias=False))(torch.zeros(1, 2)), torch.zeros(1, 3))


def test_a_token_scores_alike_whatever_rows_are_packed_beside_it():
    """Bit for bit: alone, among ROW_BLOCK * 2 + 5 others (the blocked integer product), and compiled with dynamic
    shapes as the packed scorer's layers are (the custom op's shape function)."""
    int8 = Int8Linear(_linear(64, 48))
    torch.manual_seed(1)
    crowd = torch.randn(1, 2 * ROW_BLOCK + 5, 64) * 5
    compiled = torch.compile(int8, dynamic=True)
    with torch.no_grad():
        together = int8(crowd)
        for i in (0, ROW_BLOCK - 1, ROW_BLOCK, 2 * ROW_BLOCK + 4):
            assert torch.equal(int8(crowd[:, i : i + 1]), together[:, i : i + 1])
        assert torch.equal(compiled(crowd), together)
        assert torch.equal(compiled(crowd[:, 3:40]), together[:, 3:40])


def test_quantize_linears_replaces_every_linear_below_a_module():
    block = torch.nn.Sequential(_linear(8, 8), torch.nn.SiLU(), torch.nn.Sequential(_linear(8, 4, bias=False)))
    assert quantize_linears(block) == 2
    assert isinstance(block[0], Int8Linear) and isinstance(block[2][0], Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in block.modules())
    with torch.no_grad():
        assert block(torch.randn(3, 8)).shape == (3, 4)
