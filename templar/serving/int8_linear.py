"""int8 matrix products for the packed CPU scorer (`--precision int8`): W8A8, the scheme of LLM.int8()'s vector-wise
quantization without its outlier split, and of SmoothQuant's per-token dynamic setting without its smoothing.

Each `nn.Linear` of the decoder layers becomes an `Int8Linear`: its weight rounded once to int8 per output channel
(scale = max |w| of the channel / 127), each activation row (one token) rounded to int8 per call with its own
scale, the product computed exactly in int32 (`torch._int_mm`: AVX-512 VNNI / AMX int8 instructions where the CPU has
them) and scaled back to float32. The error is the two roundings' (measured on the benchmark RM: docs/benchmarks.md);
the exact integer product adds none, and because every token is quantized on its own, a token's result does not
depend on the other rows packed beside it.

On a CPU without int8 dot-product instructions (no AVX-512 VNNI, AVX-VNNI or AMX: AVX2 machines, Skylake-SP Xeons),
oneDNN computes the product with pairwise 16-bit sums that saturate for full-range operands (measured: off by up to
1.3e5 of the exact sum), so the weights are rounded to 7 bits (-63..63) there, where the sums fit. Which case a
machine is in is measured, not read from its flags (`int8_products_exact`): oneDNN's ISA can be capped
(ONEDNN_MAX_CPU_ISA) below what the CPU reports.

Rows go to the integer product in blocks of ROW_BLOCK: one [4096, 512] x [512, 2048] product measured 2.2x slower
per row than the same rows in blocks of 1024 here (its int32 output leaves the cache).
"""

from __future__ import annotations

import functools

import torch

from templar.errors import PackedScorerUnsupported

ROW_BLOCK = 512  # rows per integer product (see the module docstring)
INT8_MAX = 127  # symmetric: -127..127, so that negating a value never overflows
INT7_MAX = 63  # the weights' range where the CPU's int8 products saturate at 8 bits (see the module docstring)


@torch.library.custom_op("templar::int8_mm", mutates_args=())
def int8_mm(rows: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """[M, K] int8 x [K, N] int8 -> [M, N] int32, in blocks of ROW_BLOCK rows. A custom op so that torch.compile
    keeps the quantization before it and the scaling after it in the layer's fused kernels without tracing the loop."""
    if rows.shape[0] <= ROW_BLOCK:
        return torch._int_mm(rows, weight_t)
    out = rows.new_empty((rows.shape[0], weight_t.shape[1]), dtype=torch.int32)
    for start in range(0, rows.shape[0], ROW_BLOCK):
        torch._int_mm(rows[start : start + ROW_BLOCK], weight_t, out=out[start : start + ROW_BLOCK])
    return out


@int8_mm.register_fake
def _(rows: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], weight_t.shape[1]), dtype=torch.int32)


@functools.lru_cache(maxsize=1)
def int8_products_exact() -> bool:
    """Does `torch._int_mm` give the exact integer product for full-range int8 operands on this machine?"""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-INT8_MAX, INT8_MAX + 1, (16, 256), dtype=torch.int8, generator=generator)
    b = torch.randint(-INT8_MAX, INT8_MAX + 1, (256, 32), dtype=torch.int8, generator=generator)
    a[0], b[:, 0] = INT8_MAX, INT8_MAX  # the largest pairwise sums: where 16-bit sums saturate
    try:
        product = torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError) as exc:  # a torch build or CPU without int8 products
        raise PackedScorerUnsupported(f"torch has no int8 matrix product here ({str(exc).splitlines()[0][:160]})") \
            from exc
    return bool(torch.equal(product, a.int() @ b.int()))


def weight_max() -> int:
    """The weights' symmetric range here: 127, or 63 where full-range products are not exact."""
    return INT8_MAX if int8_products_exact() else INT7_MAX


def quantize_rows(x: torch.Tensor, levels: int = INT8_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> ([M, K] int8 in -levels..levels, [M, 1] float32 scales): each row by its own largest
    magnitude (an activation row: a token; a weight row: an output channel)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / levels
    return torch.round(x / scale).clamp(-levels, levels).to(torch.int8), scale


class Int8Linear(torch.nn.Module):
    """A float32 `nn.Linear` computed with int8 products: weight per output channel (to +-`levels`: weight_max()),
    activations per token."""

    def __init__(self, linear: torch.nn.Linear, levels: int | None = None) -> None:
        super().__init__()
        self.levels = levels or weight_max()
        quantized, scale = quantize_rows(linear.weight.detach().float(), self.levels)
        self.register_buffer("weight_t", quantized.t().contiguous())  # [in, out]: the layout _int_mm reads
        self.register_buffer("weight_scale", scale[:, 0])
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                       requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        quantized, scale = quantize_rows(rows)
        out = int8_mm(quantized, self.weight_t).float() * scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights +-{self.levels}"


def quantize_linears(module: torch.nn.Module, levels: int | None = None) -> int:
    """Replace every `nn.Linear` under `module` by an Int8Linear (weights to +-`levels`, default weight_max()), in
    place; returns how many."""
    levels = levels or weight_max()
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child, levels))
            replaced += 1
        else:
            replaced += quantize_linears(child, levels)
    return replaced
