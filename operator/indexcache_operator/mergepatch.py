"""JSON merge patches (RFC 7386) that turn one document into another, nested keys included.

A merge patch merges nested objects key by key: writing `{"status": after}` over a status that has a key
`after` lacks, at any depth, keeps the old value (a failed run would keep the previous run's pattern). So
the operator writes `diff(before, after)`: every key `after` dropped, at every depth, is set to null.
`apply` is RFC 7386's own algorithm, the slow and obviously right twin the tests compare `diff` against.
"""
from __future__ import annotations

from typing import Any


def diff(before: Any, after: Any) -> Any:
    """The smallest merge patch p with apply(before, p) == after (for documents without null values)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        if key not in before:
            patch[key] = value
        elif before[key] != value:
            patch[key] = diff(before[key], value)
    return patch


def apply(target: Any, patch: Any) -> Any:
    """RFC 7386, section 2 (MergePatch), verbatim."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply(result.get(key), value)
    return result
