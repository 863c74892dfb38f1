"""Dotted paths into a qrun config (``task.model.kwargs.lr``, ``record.2.kwargs``): how a grid axis names the
value it sets. Digit parts index lists."""

from __future__ import annotations

from typing import Any


def split_path(dotted: str) -> list[str]:
    """Split ``a.b.0.c`` into its parts (digits index lists)."""
    return dotted.split(".")


def _step(node: Any, part: str) -> Any:
    return node[int(part)] if isinstance(node, list) else node[part]


def get_parent(root: Any, dotted: str) -> tuple[Any, str | int]:
    """Return the container holding ``dotted`` and the key (or list index) inside it."""
    parts = split_path(dotted)
    node = root
    for part in parts[:-1]:
        node = _step(node, part)
    return node, (int(parts[-1]) if isinstance(node, list) else parts[-1])


def set_path(root: Any, dotted: str, value: Any) -> None:
    """Set ``dotted`` inside ``root`` (which must already be validated by ``check_path``)."""
    parent, key = get_parent(root, dotted)
    parent[key] = value


def check_path(root: Any, dotted: str, *, allow_new: bool = False) -> tuple[str, str] | None:
    """Explain why ``dotted`` does not address ``root``, or return None when it does.

    Args:
        root: the mapping the path starts from.
        dotted: ``a.b.c``; a digit part indexes a list.
        allow_new: the last part may be a key that does not exist yet.

    Returns:
        None, or (what is wrong, what was expected) for an error message.
    """
    node, walked, parts = root, "<root>", split_path(dotted)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict) and part not in node:
            if last and allow_new:
                return None
            add = " (or prefix the path with '+' to add a new key)" if last else ""
            return (f"unknown key '{part}' under {walked}",
                    f"one of: {', '.join(map(str, node)) or '(empty mapping)'}{add}")
        if isinstance(node, list) and not (part.isdigit() and int(part) < len(node)):
            return f"'{part}' is not an index of the list at {walked}", f"0..{len(node) - 1}"
        if not isinstance(node, (dict, list)):
            return f"{walked} is a {type(node).__name__}, so '{part}' does not exist", "a path to a mapping key"
        node = _step(node, part)
        walked = part if walked == "<root>" else f"{walked}.{part}"
    return None
