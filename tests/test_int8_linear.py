"""The packed scorer's int8 products (templar.serving.int8_linear): the W8A8 scheme computed exactly as stated, its
error against the float product, and the property the packed scorer relies on: a token's result does not depend on
the rows packed beside it, in blocks or not, compiled or not. The served path's agreement is in
tests/test_cpu_precision.py."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from templar.serving.int8_linear import (INT7_MAX, INT8_MAX, ROW_BLOCK, Int8Linear, int8_mm, quantize_linears,
                                         quantize_rows, weight_max)


def _linear(inputs: int, outputs: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs, bias=bias)


def test_the_product_is_the_stated_scheme_computed_exactly():
    """int8 weight per output channel (to +-weight_max(): 127, or 63 where full-range products saturate), int8
    activations per row, an exact integer product, then the two scales."""
    linear = _linear(96, 40)
    x = torch.randn(7, 96) * torch.linspace(0.1, 30, 7)[:, None]  # rows of very different magnitudes
    int8 = Int8Linear(linear)
    levels = weight_max()
    assert int8.levels == levels
    w_scale = linear.weight.abs().amax(dim=1) / levels
    w_q = torch.round(linear.weight / w_scale[:, None]).clamp(-levels, levels)
    x_scale = x.abs().amax(dim=1, keepdim=True) / INT8_MAX
    x_q = torch.round(x / x_scale).clamp(-INT8_MAX, INT8_MAX)
    expected = (x_q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double() + linear.bias.double()
    with torch.no_grad():
        assert int8.weight_t.dtype == torch.int8 and int8.weight_t.shape == (96, 40)
        assert torch.equal(int8.weight_t.t().float(), w_q)
        torch.testing.assert_close(int8(x).double(), expected, rtol=1e-6, atol=1e-6)
        # against the float product: the two roundings' error, a percent or two of the outputs' scale (twice that
        # with 7-bit weights: measured up to 2.9% over 50 seeds with oneDNN held to AVX2)
        reference = linear(x)
        error = (int8(x) - reference).abs().amax(dim=1) / reference.abs().amax(dim=1)
        assert error.max() < 0.03 * INT8_MAX / levels, error


def test_the_integer_product_is_exact_here_for_the_weights_range_chosen_here():
    """Full-range activations against weights in the range this machine's products are exact for, blocked or not."""
    generator = torch.Generator().manual_seed(2)
    rows = torch.randint(-INT8_MAX, INT8_MAX + 1, (ROW_BLOCK + 9, 512), dtype=torch.int8, generator=generator)
    levels = weight_max()
    weight_t = torch.randint(-levels, levels + 1, (512, 64), dtype=torch.int8, generator=generator)
    rows[0], weight_t[:, 0] = INT8_MAX, levels
    assert torch.equal(int8_mm(rows, weight_t), rows.int() @ weight_t.int())


def test_without_int8_dot_products_the_weights_take_7_bits_and_the_product_stays_exact():
    """oneDNN capped to AVX2 (no VNNI), as on an AVX2-only CPU or a Skylake-SP Xeon: full-range products saturate
    there, which `int8_products_exact` measures, so the weights take -63..63, where they are exact."""
    code = ("import torch; from templar.serving.int8_linear import *; import json; "
            "a = torch.full((4, 256), 127, dtype=torch.int8); w = torch.full((256, 8), 127, dtype=torch.int8); "
            "s = torch.full((256, 8), 63, dtype=torch.int8); "
            "print(json.dumps([int8_products_exact(), weight_max(), "
            "torch.equal(torch._int_mm(a, w), a.int() @ w.int()), torch.equal(int8_mm(a, s), a.int() @ s.int())]))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == f"[false, {INT7_MAX}, false, true]", out.stderr[-2000:]


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
