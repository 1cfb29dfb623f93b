"""The IndexCache layer pattern: which layers run their indexer (F) and which reuse indices (S).

Semantics follow the upstream config keys (SGLang / vLLM / transformers), 0-based layer l:
`index_topk_pattern` (a string of F/S, one per layer) wins; otherwise layer l is S iff
`max(l - offset + 1, 0) % freq != 0`, with `offset = index_skip_topk_offset` (default 2: layers 0 and 1
are F) and `freq = index_topk_freq` (default 1: every layer F). Layer 0 is always F. An S layer reuses
the top-k indices of the nearest preceding F layer.
"""

from __future__ import annotations


def resolve_pattern(num_layers: int, *, freq: int = 1, offset: int = 2, pattern: str | None = None) -> str:
    """Return the F/S string for `num_layers` layers (explicit `pattern` wins over freq/offset)."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if pattern is not None:
        validate_pattern(pattern, num_layers)
        return pattern
    if not isinstance(freq, int) or freq < 1:
        raise ValueError(f"index_topk_freq (freq) must be an integer >= 1 (1 = every layer F), got {freq!r}")
    if not isinstance(offset, int) or offset < 1:
        raise ValueError(
            f"index_skip_topk_offset (offset) must be an integer >= 1 (2 keeps layers 0 and 1 F), got {offset!r}")
    return "".join("S" if max(layer - offset + 1, 0) % freq != 0 else "F" for layer in range(num_layers))


def validate_pattern(pattern: str, num_layers: int | None = None) -> None:
    """Raise ValueError naming what is wrong with an F/S pattern string."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"index_topk_pattern must be a non-empty string of F and S, got {pattern!r}")
    bad = sorted({c for c in pattern if c not in "FS"})
    if bad:
        raise ValueError(
            f"index_topk_pattern may contain only 'F' (full: run the indexer) and 'S' (shared), "
            f"found {''.join(bad)!r} in {pattern!r}")
    if num_layers is not None and len(pattern) != num_layers:
        raise ValueError(
            f"index_topk_pattern has {len(pattern)} entries but the model has {num_layers} layers: "
            f"give one F/S per layer")
    if pattern[0] != "F":
        raise ValueError(f"index_topk_pattern must start with 'F': layer 0 has no earlier layer to share from ({pattern!r})")


def full_layers(pattern: str) -> list[int]:
    """Indices of the F layers."""
    return [layer for layer, kind in enumerate(pattern) if kind == "F"]


def source_layers(pattern: str) -> list[int]:
    """For each layer, the layer whose indexer produced its top-k indices (itself if F)."""
    validate_pattern(pattern)
    sources, last_full = [], 0
    for layer, kind in enumerate(pattern):
        if kind == "F":
            last_full = layer
        sources.append(last_full)
    return sources


def uniform_pattern(num_layers: int, num_full: int) -> str:
    """Evenly spaced F layers, layer 0 included: the baseline the calibrated pattern must beat."""
    if not 1 <= num_full <= num_layers:
        raise ValueError(f"num_full must be in 1..{num_layers}, got {num_full}")
    chosen = {round(i * num_layers / num_full) for i in range(num_full)}
    return "".join("F" if layer in chosen else "S" for layer in range(num_layers))


def pattern_from_indexer_types(indexer_types: list[str]) -> str:
    """transformers' `indexer_types` (list of "full"/"shared") as an F/S string."""
    names = {"full": "F", "shared": "S"}
    bad = [t for t in indexer_types if t not in names]
    if bad:
        raise ValueError(f"indexer_types entries must be 'full' or 'shared', found {bad[:3]}")
    return "".join(names[t] for t in indexer_types)
