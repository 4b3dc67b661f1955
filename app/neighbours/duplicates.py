"""Near-duplicate groups: connected components of the neighbour graph's edges at or above a threshold.

Union-find (disjoint-set forest with path halving and union by size; Tarjan, "Efficiency of a Good But Not Linear
Set Union Algorithm", JACM 1975) over the edges with ``score >= threshold``. Only edges of the graph are seen: each
image's ``NEIGHBOURS_K`` nearest neighbours, so a group larger than ``k + 1`` still forms through chains of
neighbours, but a pair at or above the threshold that is in neither image's top ``k`` is missed (only possible
when an image has more than ``k`` near-duplicates). ``DUPLICATE_THRESHOLD`` was chosen on instance_small
(``bench/duplicates.py``, docs/benchmarks.md "Near-duplicate groups").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.neighbours.store import Edge


@dataclass(frozen=True, slots=True)
class DuplicateGroup:
    """One group of near-duplicates: ``ids`` (at least 2), and the lowest and highest cosine similarity among the
    graph edges that joined it (``min_score`` is at least the threshold)."""

    ids: tuple[str, ...]
    min_score: float
    max_score: float


class _DisjointSets:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        self.size.setdefault(x, 1)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def duplicate_groups(edges: Iterable[Edge], threshold: float, alive: set[str] | None = None) -> list[DuplicateGroup]:
    """Connected components of the edges with ``score >= threshold``, largest first.

    Args:
        edges: graph edges (either direction; an edge seen twice counts once).
        threshold: cosine similarity in ``[-1, 1]``.
        alive: when given, only edges whose both ends are in it are used (images deleted since the graph was built
            are left out, so they cannot join two groups either).

    Returns:
        Groups of at least two images, ordered by size (descending), then ``max_score`` (descending), then first id;
        each group's ``ids`` sorted.
    """
    sets = _DisjointSets()
    used: list[Edge] = []
    for e in edges:
        if e.score < threshold or e.src == e.dst:
            continue
        if alive is not None and (e.src not in alive or e.dst not in alive):
            continue
        sets.union(e.src, e.dst)
        used.append(e)
    members: dict[str, list[str]] = {}
    for x in sets.parent:
        members.setdefault(sets.find(x), []).append(x)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for e in used:
        root = sets.find(e.src)
        lo[root] = min(lo.get(root, e.score), e.score)
        hi[root] = max(hi.get(root, e.score), e.score)
    groups = [DuplicateGroup(tuple(sorted(ids)), lo[root], hi[root]) for root, ids in members.items() if len(ids) > 1]
    groups.sort(key=lambda g: (-len(g.ids), -g.max_score, g.ids[0]))
    return groups
