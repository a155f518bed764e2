"""Minimal pytrees: nested dicts, tuples and lists of arrays (parameter dicts, tuple outputs).

A *leaf* is anything that is not a dict, tuple or list. ``None`` is a leaf too (an absent
cotangent). Paths name leaves for error messages: ``params['query']['weight']`` is
``"query.weight"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Tree = Any


def leaves_with_paths(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, leaf)`` in a fixed order (dict insertion order, then sequence order)."""
    if isinstance(tree, dict):
        for key, sub in tree.items():
            yield from leaves_with_paths(sub, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (tuple, list)):
        for i, sub in enumerate(tree):
            yield from leaves_with_paths(sub, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` in :func:`leaves_with_paths` order."""
    return [leaf for _, leaf in leaves_with_paths(tree)]


def map_leaves(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """A tree of the same structure with ``fn`` applied to every leaf."""
    if isinstance(tree, dict):
        return {key: map_leaves(fn, sub) for key, sub in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_leaves(fn, sub) for sub in tree)
    return fn(tree)


def replace_leaves(tree: Tree, new_leaves: list[Any]) -> Tree:
    """A tree of the same structure whose leaves are ``new_leaves``, in order."""
    it = iter(new_leaves)
    result = map_leaves(lambda _: next(it), tree)
    if next(it, _SENTINEL) is not _SENTINEL:
        raise ValueError("refattn: too many leaves for the tree structure")
    return result


def structure(tree: Tree) -> Any:
    """A hashable description of the tree's structure, leaves erased."""
    if isinstance(tree, dict):
        return ("dict", tuple((k, structure(v)) for k, v in tree.items()))
    if isinstance(tree, (tuple, list)):
        return (type(tree).__name__, tuple(structure(v) for v in tree))
    return "*"


_SENTINEL = object()
