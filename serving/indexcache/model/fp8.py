"""FP8 block-scaled weights kept FP8 in memory (DeepSeek-V3 / V3.2 and GLM-5 FP8 checkpoints).

Those checkpoints store most linear weights as float8_e4m3fn, each with a `weight_scale_inv` of one fp32
scale per 128 x 128 block: w_real[n, k] = w8[n, k] * weight_scale_inv[n // 128, k // 128]. The loader
(checkpoint.py, `fp8="keep"`, the default) builds the model as usual, then swaps every module whose
weights arrive in FP8 for the one here, so they stay 1 byte per element:

  - `FP8BlockLinear` for a linear: y = x @ w_real^T through `kernels.fp8_block_linear` (on CUDA the
    block-scaled FP8 GEMM, activations quantised per token per 128 of K as DeepSeek does; on the CPU the
    reference twin, which quantises the activations the same way and multiplies in fp32);
  - `FP8Experts` for a layer's routed experts, stacked as `Experts` stacks them (gate_up_proj (E, 2I, D),
    down_proj (E, D, I)), with stacked scales gate_up_proj_scale_inv (E, 2 ceil(I/128), ceil(D/128)) (the
    gate_proj scales then the up_proj scales, each matrix's own blocks) and down_proj_scale_inv
    (E, ceil(D/128), ceil(I/128)); `kernels.moe_routed` takes them as they are.

Parameter names are the checkpoint's (`...q_a_proj.weight`, `...q_a_proj.weight_scale_inv`), so a state
dict of an FP8 model saves back into an FP8 checkpoint. What stays in the model dtype: embeddings, the LM
head, norms, the router and the indexer's weights_proj (bf16 / fp32 in the checkpoints too), and
`kv_b_proj`: the absorbed MLA multiplies its two halves per head inside einsums rather than applying it as
a linear, so it is dequantised once at load (vLLM and SGLang do the same), 2 bytes instead of 1 for
32768 x 512 elements per DeepSeek-V3.2 layer (1 GB over 61 layers in bf16, against 0.5 GB in FP8).
`fp8="dequantize"` dequantises everything at load instead (the comparison path).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .. import kernels
from ..kernels.reference import FP8_BLOCK, quantize_weight_fp8_blocks

FP8_DTYPE = torch.float8_e4m3fn
# Checkpoint weights dequantised at load even in "keep" mode (see the module docstring).
DEQUANTIZED_AT_LOAD = re.compile(r"\.self_attn\.kv_b_proj\.weight$")
# The weights DeepSeek-V3.2's FP8 release stores in e4m3 (HF names): every attention projection, the
# indexer's wq_b and wk, the dense MLP, the shared expert and each routed expert. What a synthetic FP8
# checkpoint (quantize_checkpoint_tensors) quantises.
FP8_CHECKPOINT_WEIGHTS = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|q_proj|k_proj|v_proj"
    r"|indexer\.wq_b|indexer\.wk)|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


class _KeepsFP8(nn.Module):
    """`module.to(torch.bfloat16)` casts every floating tensor, e4m3 and fp32 scales included; an FP8
    module moves between devices but keeps its weights e4m3 (exact: e4m3 values are bf16 / fp32 values)
    and its scales fp32 (taken from before the cast, which could have rounded them)."""

    def _apply(self, fn, recurse=True):
        before = {name: p.data for name, p in self.named_parameters(recurse=False)}   # the tensors, not the Parameters
        super()._apply(fn, recurse)
        for name, p in self.named_parameters(recurse=False):
            old = before[name]
            if p.dtype != old.dtype:
                p.data = (p.data if old.dtype == FP8_DTYPE else old).to(device=p.device, dtype=old.dtype)
        return self


class FP8BlockLinear(_KeepsFP8):
    """A bias-free linear whose weight stays e4m3: weight (out, in) e4m3, weight_scale_inv
    (ceil(out/128), ceil(in/128)) fp32. y (..., out) = x (..., in) @ w_real^T, in x's dtype."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(_blocks(out_features), _blocks(in_features), dtype=torch.float32, device=device),
            requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.fp8_block_linear(x, self.weight, self.weight_scale_inv, out_dtype=x.dtype)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """w_real (out, in) in dtype."""
        return kernels.dequantize_weight_fp8_blocks(self.weight, self.weight_scale_inv, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 with 128x128 block scales"


class FP8Experts(_KeepsFP8):
    """The routed experts of one MoE layer in e4m3 (layout in the module docstring). Called like
    `dsa.Experts`: (x (N, D), router weights (N, k), expert ids (N, k)) -> (N, D) fp32."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, device=None):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim

        def param(*shape, dtype):
            return nn.Parameter(torch.ones(*shape, dtype=dtype, device=device), requires_grad=False)

        self.gate_up_proj = param(n_experts, 2 * inter_dim, dim, dtype=FP8_DTYPE)
        self.gate_up_proj_scale_inv = param(n_experts, 2 * _blocks(inter_dim), _blocks(dim), dtype=torch.float32)
        self.down_proj = param(n_experts, dim, inter_dim, dtype=FP8_DTYPE)
        self.down_proj_scale_inv = param(n_experts, _blocks(dim), _blocks(inter_dim), dtype=torch.float32)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return kernels.moe_routed(x, weights, experts, self.gate_up_proj, self.down_proj,
                                  gate_up_scale_inv=self.gate_up_proj_scale_inv,
                                  down_scale_inv=self.down_proj_scale_inv)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim={self.dim}, inter_dim={self.inter_dim}, e4m3 with 128x128 block scales"


def fp8_parameter_names(model: nn.Module) -> set[str]:
    """State-dict names of the model's FP8 weights and their scales."""
    return {name for name, t in model.state_dict(keep_vars=True).items()
            if t.dtype == FP8_DTYPE or name.endswith("_scale_inv")}


def keep_fp8(model: nn.Module, fp8_weights: set[str]) -> set[str]:
    """Swap the modules whose checkpoint weights are FP8 for FP8 modules, in place (on the device the
    replaced module was on: meta while loading). fp8_weights: HF names of the checkpoint's FP8 weights
    (per expert for routed experts). A layer's routed experts turn FP8 only when all of them are; kv_b_proj
    is left to be dequantised (DEQUANTIZED_AT_LOAD). Returns the names of the weights kept FP8, as given."""
    kept, experts = set(), {}
    for name in fp8_weights:
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), set()).add(name)
            continue
        if DEQUANTIZED_AT_LOAD.search(name) or not name.endswith(".weight"):
            continue
        path = name[: -len(".weight")]
        module = model.get_submodule(path)
        if type(module) is not nn.Linear or module.bias is not None:
            continue                                   # not a plain linear: dequantised at load
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child,
                FP8BlockLinear(module.in_features, module.out_features, device=module.weight.device))
        kept.add(name)
    for path, names in experts.items():
        module = model.get_submodule(path)
        E, D, inter = module.down_proj.shape
        if len(names) != 3 * E:
            raise ValueError(f"{path}: {len(names)} of the {3 * E} routed expert matrices are FP8; a layer's "
                             f"experts must be all FP8 or none, or load with fp8='dequantize'")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, FP8Experts(E, D, inter, device=module.down_proj.device))
        kept |= names
    return kept


def dequantize_fp8(module: nn.Module, dtype: torch.dtype) -> int:
    """Swap the FP8 linears inside `module` back for float nn.Linear (weights dequantised to dtype), in
    place: what a module needs before its weights train (distillation trains the indexers of an FP8
    checkpoint). Returns how many were swapped."""
    swapped = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, FP8BlockLinear):
            linear = nn.Linear(child.in_features, child.out_features, bias=False, device=child.weight.device,
                               dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(child.dequantized(dtype))
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, linear)
            swapped += 1
    return swapped


def quantize_checkpoint_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named checkpoint tensors (per routed expert, as in the files) -> the same with every weight that
    DeepSeek-V3.2 stores in FP8 (FP8_CHECKPOINT_WEIGHTS) quantised to e4m3 with its `weight_scale_inv`
    of 128 x 128 blocks: a synthetic FP8 checkpoint from any float one (tests, benchmarks)."""
    out = {}
    for name, tensor in tensors.items():
        if FP8_CHECKPOINT_WEIGHTS.match(name):
            out[name], out[name + "_scale_inv"] = quantize_weight_fp8_blocks(tensor)
        else:
            out[name] = tensor
    return out


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """{'weights': bytes the model's parameters take, 'dequantized': what they would take with every FP8
    weight dequantised to `dtype` and its scales dropped, 'fp8': bytes of the FP8 weights and scales}."""
    seen, total, fp8, dequantized = set(), 0, 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        total += nbytes
        if p.dtype == FP8_DTYPE:
            fp8 += nbytes
            dequantized += p.numel() * torch.empty((), dtype=dtype).element_size()
        elif name.endswith("_scale_inv"):
            fp8 += nbytes
        else:
            dequantized += nbytes
    return {"weights": total, "dequantized": dequantized, "fp8": fp8}
