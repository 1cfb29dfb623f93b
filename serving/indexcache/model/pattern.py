"""The IndexCache layer pattern: which layers run their indexer (F) and which reuse indices (S).
The rule itself (freq/offset, validity) is `indexcache_contracts.pattern`, shared with the operator;
here are the model side's helpers around it.

Semantics follow the upstream config keys (SGLang / vLLM / transformers), 0-based layer l:
`index_topk_pattern` (a string of F/S, one per layer) wins; otherwise layer l is S iff
`max(l - offset + 1, 0) % freq != 0`, with `offset = index_skip_topk_offset` (default 2: layers 0 and 1
are F) and `freq = index_topk_freq` (default 1: every layer F). Layer 0 is always F. An S layer reuses
the top-k indices of the nearest preceding F layer.
"""

from __future__ import annotations

from indexcache_contracts.pattern import DEFAULT_FREQ, DEFAULT_OFFSET, pattern_from_freq, pattern_problem


def resolve_pattern(num_layers: int, *, freq: int = DEFAULT_FREQ, offset: int = DEFAULT_OFFSET,
                    pattern: str | None = None) -> str:
    """Return the F/S string for `num_layers` layers (explicit `pattern` wins over freq/offset)."""
    if pattern is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        validate_pattern(pattern, num_layers)
        return pattern
    return pattern_from_freq(num_layers, freq, offset)


ALL_FULL_NAMES = ("all-F", "F*")   # what a user types for "every layer runs its indexer"


def expand_pattern_name(pattern: str | None, num_layers: int) -> str | None:
    """A --pattern argument as an F/S string: "all-F" or "F*" -> F for every one of `num_layers` layers
    (the behaviour before a checkpoint shipped a calibrated pattern); anything else is returned unchanged."""
    return "F" * num_layers if pattern in ALL_FULL_NAMES else pattern


def validate_pattern(pattern: str, num_layers: int | None = None) -> None:
    """Raise ValueError naming what is wrong with an F/S pattern string."""
    why = pattern_problem(pattern, num_layers)
    if why:
        raise ValueError(why)


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
