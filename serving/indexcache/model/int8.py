"""Weight-only int8 for the CPU fast forward (`quantization="int8"`): half the bytes of bf16 weights.

A decode step reads every weight once per token, and on a few shared CPU cores memory bandwidth, not
arithmetic, bounds it: the bundled SmolLM2 model is 269 MB in bf16 per token. Int8 weights with one scale
per output channel (symmetric, round to nearest: w ~= q * scale, q in [-127, 127]) halve that.

Two ways to multiply, chosen by the number of rows (tokens) of the input:
  - few rows (decode of one or a few requests): `torch._weight_int8pack_mm`, which reads the int8 weight
    directly (measured on 2 cores of a Xeon with AMX, bundled model shapes, 1 row: 2.5x faster than the
    bf16 GEMV for all 30 layers and the LM head together);
  - more rows (prefill chunks, batched decode): that kernel's cost grows with the rows (at 8 rows it is
    already slower than bf16), so a bf16 GEMM runs on the dequantised weight q * scale, kept beside q.
Both compute with the same quantised weight; `ref_int8_linear` is the slow, obviously-right twin.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# at most this many input rows go through the int8 kernel; more use the dequantised weight
INT8_KERNEL_MAX_ROWS = 4


@dataclass
class Int8Weight:
    """A (N, K) linear weight as q (N, K) int8 and scale (N,) in the activations' dtype, plus the
    dequantised (N, K) weight in that dtype for many-row inputs."""
    q: torch.Tensor
    scale: torch.Tensor
    dequantized: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def rows(self, n: int) -> "Int8Weight":
        """The first n output channels (a view: the packed projections run a prefix of their rows)."""
        return Int8Weight(self.q[:n], self.scale[:n], self.dequantized[:n])


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 of a (N, K) weight; scales in the weight's dtype."""
    if weight.dim() != 2:
        raise ValueError(f"int8 quantisation takes a (N, K) linear weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(weight.dtype)   # (N,)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()     # (N, K)
    return Int8Weight(q, scale, (q.float() * scale.float()[:, None]).to(weight.dtype).contiguous())


def int8_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x (..., K) @ w.T -> (..., N) in x's dtype: the int8 kernel for few rows, else the dequantised GEMM."""
    rows = x.numel() // x.shape[-1]
    if rows > INT8_KERNEL_MAX_ROWS:
        return F.linear(x, w.dequantized)
    out = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), w.q, w.scale)        # (rows, N)
    return out.view(*x.shape[:-1], w.q.shape[0])


def ref_int8_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The twin of int8_linear: dequantise in fp32, multiply in fp32, round once to x's dtype."""
    return F.linear(x.float(), w.q.float() * w.scale.float()[:, None]).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """F.linear for a plain weight or an Int8Weight."""
    return int8_linear(x, w) if isinstance(w, Int8Weight) else F.linear(x, w)


def dequantize_linears(model: torch.nn.Module) -> torch.nn.Module:
    """The slow twin of an int8 model, in place: every nn.Linear weight (the LM head included, untied from the
    embedding, which stays as it is) replaced by its int8 dequantised value. Returns the model."""
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(quantize_int8(module.weight).dequantized.clone(),
                                                   requires_grad=False)
    return model
