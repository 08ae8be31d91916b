"""The recursion tree above the leaves, chosen by content so that it survives edits.

The source is first cut into leaf spans once, from its start
(:func:`rlm_graph.split.split_span` with the leaf budget). That cut resynchronises
right after an edit: a cut depends only on where its span starts, so as soon as
one cut after the edit falls where it fell before, every later cut does too.

The tree above the leaves must not depend on the total size either, or one
added sentence would move every group boundary and change every merge. So group
boundaries are chosen by content, as in a content-defined chunker: the boundary
after leaf ``k`` gets a *level*, the number of times ``fan_out`` divides a hash of
leaf ``k``'s text (so a boundary reaches level ``h`` with probability
``fan_out ** -h``). A node of height ``h`` is cut into children at its boundaries of
level ``h - 1``, so a node has about ``fan_out`` children and an edit changes only
the nodes on the path from the edited leaf to the root.

A node that still gets more than ``fan_out`` children (the level counts are
random) has them packed into consecutive groups of at most ``fan_out``, a local
change confined to that node; a node at the last allowed depth takes all its
leaves as children.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Group", "boundary_levels", "child_groups", "root_height"]

_MAX_LEVEL = 32


@dataclass(frozen=True, slots=True)
class Group:
    """A run of consecutive leaves ``[first, stop)`` that becomes one task."""

    first: int
    stop: int
    height: int
    """Its height in the tree: 0 for a single leaf."""

    @property
    def size(self) -> int:
        """How many leaves it holds."""
        return self.stop - self.first


def boundary_levels(leaf_texts: Sequence[str], base: int) -> list[int]:
    """The level of the boundary after each leaf: how often ``base`` divides its hash.

    The last leaf's level is unused (no boundary follows it inside the source).
    """
    levels = []
    for text in leaf_texts:
        value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest())
        level = 0
        while value and value % base == 0 and level < _MAX_LEVEL:
            value //= base
            level += 1
        levels.append(level + 1 if value == 0 else level)
    return levels


def root_height(levels: Sequence[int]) -> int:
    """The height of a tree over all leaves: one more than its highest inner boundary."""
    inner = levels[:-1]
    return (max(inner) + 1) if inner else 0


def child_groups(
    levels: Sequence[int],
    group: Group,
    *,
    fan_out: int,
    last_level: bool,
) -> list[Group]:
    """The children of a group: cut at its boundaries one level below its height.

    Args:
        levels: :func:`boundary_levels` of every leaf of the source.
        group: the group to cut (at least two leaves).
        fan_out: most children a group gets.
        last_level: the children must be leaves (the depth limit is reached).
    """
    singles = [Group(k, k + 1, 0) for k in range(group.first, group.stop)]
    if last_level:
        return singles
    height = group.height
    cuts: list[int] = []
    while height > 1 and not cuts:
        height -= 1
        cuts = [k + 1 for k in range(group.first, group.stop - 1) if levels[k] >= height]
    if cuts:
        edges = [group.first, *cuts, group.stop]
        children = [_collapse(Group(a, b, height), levels) for a, b in zip(edges, edges[1:], strict=False)]
    else:
        height, children = 0, singles
    if len(children) <= fan_out:
        return children
    # Too many children for one node: pack them into fan_out consecutive groups
    # (a pack that is still too big is packed again when it is cut).
    per = math.ceil(len(children) / fan_out)
    packed = []
    for index in range(0, len(children), per):
        members = children[index : index + per]
        if len(members) == 1:
            packed.append(members[0])
        else:
            packed.append(Group(members[0].first, members[-1].stop, height + 1))
    return packed


def _collapse(group: Group, levels: Sequence[int]) -> Group:
    """A single leaf is height 0; otherwise the height its inner boundaries need."""
    if group.size == 1:
        return Group(group.first, group.stop, 0)
    inner = max(levels[group.first : group.stop - 1])
    return Group(group.first, group.stop, min(group.height, inner + 1))
