"""The JSON object hook that refuses duplicate keys, shared by every file and message reader.

With two ``post_id``s, ``labels`` or ``arch`` keys in one object, Python's ``json`` keeps the last
silently and another reader (a dashboard, a Go service) may take the first: the two would then
disagree about the same bytes.
"""

from __future__ import annotations


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for ``json.loads``: the object, or ValueError naming a repeated key."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate[:64]!r} in one object")
    return obj
