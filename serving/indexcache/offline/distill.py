"""Training-aware IndexCache: train each F layer's indexer for the S layers that will reuse its indices.

Under a pattern, F layer l serves itself and the S layers l+1..l+m after it (pattern.source_layers). Its
top-k should then cover the keys all of them attend to, not only its own. The multi-layer loss
(IndexCache paper; docs/calibration.md), per query row t:

    L_t = 1/(m+1) * sum_{j=0..m} KL(p_t^(l+j) || softmax(I_t^(l)))

p^(l+j): the head-summed, L1-normalised dense attention of served layer l+j (model Capture);
I^(l): layer l's indexer scores. Since sum_j KL(p_j || q) = const - sum_j sum_s p_j log q, its gradient
equals that of the centroid form KL(mean_j p_j || q) (tested on random tensors): the indexer learns the
centroid of the served layers' attention. The LM is frozen; only the F layers' indexers train.

The targets come from the dense model (as in DSA's indexer warm-up): one dense forward with Capture,
under no_grad, records every served layer's attention and, through a forward pre-hook, the normalised
hidden state entering each F layer's attention; the indexer then runs on that input with gradients.
(The model's dense branch skips the indexer, so Capture.scores is empty under attention="dense".)
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.dsa import Capture, DSAForCausalLM, ForwardContext
from ..model.fp8 import dequantize_fp8
from ..model.pattern import source_layers, validate_pattern
from .indexer_stats import layer_index_scores
# the loss: each F layer's scores against the attention of every layer it serves (its centroid, below)
from .indexer_stats import multi_layer_kl as multi_layer_distill_loss


def served_layers(pattern: str) -> dict[int, list[int]]:
    """F layer -> the layers that use its indices: itself and the S layers up to the next F layer."""
    served: dict[int, list[int]] = {}
    for layer, source in enumerate(source_layers(pattern)):
        served.setdefault(source, []).append(layer)
    return served


def centroid_distill_loss(index_scores: torch.Tensor, attention: list[torch.Tensor],
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """KL(mean_j p_j || softmax(index_scores)): the explicit centroid form (the test's reference)."""
    return multi_layer_distill_loss(index_scores, [torch.stack(attention).mean(0)], rows)


# ---------------------------------------------------------------------------------------------------
# targets and indexer scores from one dense forward
# ---------------------------------------------------------------------------------------------------
@dataclass
class DenseTargets:
    attention: dict[int, torch.Tensor]         # layer -> (B, T, S) head-summed attention, no graph
    attn_inputs: dict[int, torch.Tensor]       # F layer -> (B, T, dim) input of its attention, no graph
    ctx: ForwardContext
    rows: torch.Tensor                         # (B, T) real (non-padding) query rows


@torch.no_grad()
def dense_targets(model: DSAForCausalLM, tokens: torch.Tensor, lengths: torch.Tensor, pattern: str) -> DenseTargets:
    full = [l for l, kind in enumerate(pattern) if kind == "F"]
    inputs: dict[int, torch.Tensor] = {}
    seen: dict[str, ForwardContext] = {}

    def hook(layer):
        def record(module, args):
            inputs[layer] = args[0].detach()
            seen["ctx"] = args[1]
        return record

    handles = [model.model.layers[l].self_attn.register_forward_pre_hook(hook(l)) for l in full]
    try:
        capture = Capture(attention=True, index_scores=False)
        model(tokens, pattern=pattern, attention="dense", capture=capture)
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    return DenseTargets(capture.attn, inputs, seen["ctx"], rows)


def distill_loss(model: DSAForCausalLM, targets: DenseTargets, pattern: str) -> dict[int, torch.Tensor]:
    """Per F layer, the multi-layer loss over the layers it serves (graph through its indexer only)."""
    return {l: multi_layer_distill_loss(layer_index_scores(model, l, targets.attn_inputs[l], targets.ctx),
                                        [targets.attention[j] for j in served], targets.rows)
            for l, served in served_layers(pattern).items()}


@torch.no_grad()
def served_mass_kept(model: DSAForCausalLM, targets: DenseTargets, pattern: str) -> dict[int, float]:
    """Per F layer, the share of its served layers' mean attention that falls on its top-k keys (0..1):
    what the S layers keep of their attention when they reuse these indices."""
    topk = model.args.index_topk
    out = {}
    for l, served in served_layers(pattern).items():
        scores = layer_index_scores(model, l, targets.attn_inputs[l], targets.ctx)
        k = min(topk, scores.shape[-1])
        idx = scores.topk(k, dim=-1).indices
        centroid = torch.stack([targets.attention[j] for j in served]).mean(0)
        valid = torch.isfinite(scores.gather(-1, idx))
        mass = (centroid.gather(-1, idx) * valid).sum(-1)                          # (B, T)
        out[l] = float(mass[targets.rows].mean())
    return out


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
def make_batches(token_lists: list[list[int]], batch_size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for i in range(0, len(token_lists), batch_size):
        group = token_lists[i:i + batch_size]
        tokens = torch.zeros(len(group), max(map(len, group)), dtype=torch.long)
        for r, s in enumerate(group):
            tokens[r, : len(s)] = torch.tensor(s)
        batches.append((tokens.to(device), torch.tensor([len(s) for s in group], device=device)))
    return batches


@dataclass
class DistillReport:
    pattern: str
    steps: int
    train_losses: list[float] = field(default_factory=list)
    heldout_loss_before: float = float("nan")
    heldout_loss_after: float = float("nan")
    mass_kept_before: dict[int, float] = field(default_factory=dict)
    mass_kept_after: dict[int, float] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_json(self) -> dict:
        return {"pattern": self.pattern, "steps": self.steps, "train_losses": self.train_losses,
                "heldout_loss_before": self.heldout_loss_before, "heldout_loss_after": self.heldout_loss_after,
                "mass_kept_before": {str(k): v for k, v in self.mass_kept_before.items()},
                "mass_kept_after": {str(k): v for k, v in self.mass_kept_after.items()},
                "duration_s": self.duration_s}


def evaluate(model, batches, pattern) -> tuple[float, dict[int, float]]:
    losses, mass = [], {}
    for tokens, lengths in batches:
        targets = dense_targets(model, tokens, lengths, pattern)
        with torch.no_grad():
            per_layer = distill_loss(model, targets, pattern)
        losses.append(float(torch.stack(list(per_layer.values())).mean()))
        for l, v in served_mass_kept(model, targets, pattern).items():
            mass[l] = mass.get(l, 0.0) + v / len(batches)
    return sum(losses) / len(losses), {l: round(v, 4) for l, v in sorted(mass.items())}


def distill(model: DSAForCausalLM, pattern: str, train: list[list[int]], heldout: list[list[int]], *,
            steps: int = 200, lr: float = 1e-3, batch_size: int = 4, seed: int = 0,
            progress: bool = False) -> DistillReport:
    """Train the F layers' indexers of `pattern` with the multi-layer loss; everything else stays frozen."""
    t0 = time.monotonic()
    validate_pattern(pattern, model.args.n_layers)
    model.check_pattern(pattern)
    if not train:
        raise ValueError("no training samples for distillation")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    device = model.lm_head.weight.device
    torch.manual_seed(seed)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    train_batches = make_batches([train[i] for i in order], batch_size, device)
    heldout_batches = make_batches(heldout or train[:batch_size], batch_size, device)

    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for l in served_layers(pattern):
        indexer = model.model.layers[l].self_attn.indexer
        dequantize_fp8(indexer, model.lm_head.weight.dtype)     # FP8 checkpoints: the weights that train are float
        for p in indexer.parameters():
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    report = DistillReport(pattern=pattern, steps=steps)
    report.heldout_loss_before, report.mass_kept_before = evaluate(model, heldout_batches, pattern)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="distill", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for step in range(steps):
            tokens, lengths = train_batches[step % len(train_batches)]
            targets = dense_targets(model, tokens, lengths, pattern)
            loss = torch.stack(list(distill_loss(model, targets, pattern).values())).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            report.train_losses.append(loss.item())
            if bar is not None:
                bar.set_postfix_str(f"loss {loss.item():.4f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for p in params:
            p.requires_grad_(False)
    report.heldout_loss_after, report.mass_kept_after = evaluate(model, heldout_batches, pattern)
    report.duration_s = round(time.monotonic() - t0, 3)
    return report


def format_report(report: DistillReport) -> str:
    lines = [f"pattern {report.pattern}: {report.steps} steps, {report.duration_s:.1f} s",
             f"held-out multi-layer KL {report.heldout_loss_before:.4f} -> {report.heldout_loss_after:.4f}",
             f"{'F layer':>8} {'serves':>12} {'mass kept before':>17} {'after':>7}"]
    served = served_layers(report.pattern)
    for l in sorted(report.mass_kept_after):
        span = f"{served[l][0]}..{served[l][-1]}"
        lines.append(f"{l:>8} {span:>12} {report.mass_kept_before[l]:>17.3f} {report.mass_kept_after[l]:>7.3f}")
    return "\n".join(lines)


def write_report(report: DistillReport, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "distill_report.json"
    path.write_text(json.dumps(report.to_json(), indent=2))
    return path
