"""The IndexCache layer pattern rule: one letter per layer, F runs its indexer, S reuses the top-k
indices of the nearest preceding F layer.

Upstream semantics (SGLang / vLLM / transformers config keys), 0-based layer l: an explicit
`index_topk_pattern` wins; otherwise layer l is S iff `max(l - offset + 1, 0) % freq != 0`, with
`offset = index_skip_topk_offset` (default 2: layers 0 and 1 are F) and `freq = index_topk_freq`
(default 1: every layer F). Layer 0 is always F (offset >= 1 guarantees it).
"""
from __future__ import annotations

DEFAULT_FREQ = 1
DEFAULT_OFFSET = 2


def pattern_from_freq(num_layers: int, freq: int = DEFAULT_FREQ, offset: int = DEFAULT_OFFSET) -> str:
    """The F/S string the freq/offset rule gives for `num_layers` layers.

    47 layers, freq 4, offset 2 -> F at 0, 1, 5, 9, ..., 45 (13 F)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ValueError(f"index_topk_freq (freq) must be an integer >= 1 (1 = every layer F), got {freq!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 1:
        raise ValueError(
            f"index_skip_topk_offset (offset) must be an integer >= 1 (2 keeps layers 0 and 1 F), got {offset!r}")
    return "".join("S" if max(layer - offset + 1, 0) % freq != 0 else "F" for layer in range(num_layers))


def pattern_problem(pattern, num_layers: int | None = None, *, field: str = "index_topk_pattern",
                    num_layers_field: str | None = None) -> str | None:
    """Why `pattern` cannot run on a model of `num_layers` layers (None: it can).

    `field` names the pattern in the message (a config key, a CRD field); `num_layers_field`, when
    given, names where the layer count came from."""
    if not isinstance(pattern, str) or not pattern:
        return f"{field} must be a non-empty string of F and S, got {pattern!r}"
    bad = sorted({c for c in pattern if c not in "FS"})
    if bad:
        return (f"{field} may contain only 'F' (full: run the indexer) and 'S' (shared), "
                f"found {''.join(bad)!r} in {pattern[:80]!r}")
    if num_layers is not None and len(pattern) != num_layers:
        source = f" ({num_layers_field} is {num_layers})" if num_layers_field else ""
        return (f"{field} has {len(pattern)} entries but the model has {num_layers} layers{source}: "
                f"give one F/S per layer")
    if pattern[0] != "F":
        return (f"{field} must start with 'F': layer 0 has no earlier layer to share from, so start with F "
                f"({pattern[:80]!r})")
    return None


def full_layer_count(pattern: str) -> int:
    """F layers in the pattern: the indexers that run."""
    return pattern.count("F")
