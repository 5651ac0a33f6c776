"""An approximate prefix tree of the prompts sent to each instance: a chain of hashed blocks.

The ``prefix`` policy needs to know, for a new prompt, which instance was already sent
the longest leading part of it (and so probably still holds it in a slot's KV cache).
It never sees tokens, so it cuts the prompt *text* into fixed-size character blocks and
hashes them as a chain: block ``k``'s hash covers block ``k`` and the hash of block
``k - 1``, so one hash names a whole prefix. A "radix tree" is then just a map from
chain hash to a node that remembers which instances were sent that prefix; walking a new
prompt's chain until no instance holds a block gives the longest match, per instance.

Why this shape rather than a character trie (SGLang's): the walk costs one dict lookup
per block instead of per character, nodes are fixed size, and the only thing routing
needs (how many leading blocks each instance holds) falls out of the walk directly.

Memory is bounded by ``max_nodes`` (least recently used nodes go first). Touching a
chain moves its blocks to the most-recent end *deepest first*, so every ancestor is at
least as recent as its descendants and eviction trims chains from their leaves, never
cutting a chain in the middle (which would strand the blocks below the cut).

Hashes come from Python's built-in (per-process randomized) ``hash``: fast, and hard for
a client to aim collisions at. A tree is never persisted or shared between processes;
doing so would need a stable hash (e.g. ``blake2b``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

#: Characters per block. 64 characters is about 16 tokens of English text: small
#: enough that the match ends close to where prompts really diverge, large enough that
#: a 100 000-character prompt is ~1 600 dict lookups.
BLOCK_CHARS = 64

#: Nodes (blocks) the tree holds before evicting the least recently used: about
#: 6.4 million characters of distinct prompt text.
MAX_NODES = 100_000

#: Distinct holder sets kept for sharing before the intern table starts over.
MAX_INTERNED = 4096

_EMPTY: frozenset[str] = frozenset()


def chain_hashes(
    text: str, *, seed: object = "", block_chars: int = BLOCK_CHARS, max_blocks: int | None = None
) -> list[int]:
    """The chain hashes of ``text``'s full blocks (a trailing partial block is left out).

    ``seed`` starts the chain (the policy passes the model name, so one tree serves
    every model without prefixes of different models ever meeting). Only whole blocks
    count: a partial last block changes as soon as the prompt grows, so it could never
    match a later, longer prompt.
    """
    if block_chars <= 0:
        raise ValueError("block_chars must be positive")
    count = len(text) // block_chars
    if max_blocks is not None:
        count = min(count, max_blocks)
    previous = hash(("corral-prefix", seed))
    hashes: list[int] = []
    for start in range(0, count * block_chars, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return hashes


class PrefixTree:
    """Which holders (instance ids) were sent which prefixes, bounded by ``max_nodes``.

    A prefix is a sequence of chain hashes (see :func:`chain_hashes`). Each node is one
    block: its hash maps to the frozen set of holders sent it, and the map's order is
    the nodes' last-used order. Holder sets are interned (a fleet has few distinct
    combinations), so a node costs about 100 bytes (~10 MB at the default bound) and the
    walk compares sets by identity. Lives on the balancer's event loop; not
    thread-safe, like the rest of the scheduling state.
    """

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        if max_nodes < 1:
            raise ValueError("max_nodes must be at least 1")
        self.max_nodes = max_nodes
        self._nodes: OrderedDict[int, frozenset[str]] = OrderedDict()
        self._interned: dict[frozenset[str], frozenset[str]] = {}
        self.evicted = 0
        """Nodes evicted for the memory bound since the tree was made."""

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, block: int) -> bool:
        return block in self._nodes

    def holders_of(self, block: int) -> frozenset[str]:
        return self._nodes.get(block, _EMPTY)

    def insert(self, blocks: Sequence[int], holder: str) -> None:
        """Record that ``holder`` was sent the prefix ``blocks`` (and so each of its
        leading parts), mark the chain most recently used, and evict above the bound."""
        if not blocks:
            return
        nodes = self._nodes
        alone = self._intern(frozenset((holder,)))
        # deepest first, so that each ancestor ends up more recent than its descendants
        for block in reversed(blocks):
            holders = nodes.get(block)
            if holders is None:
                nodes[block] = alone
                continue
            nodes.move_to_end(block)
            if holder not in holders:
                nodes[block] = self._intern(holders | alone)
        self._evict()

    def match(self, blocks: Sequence[int]) -> dict[str, int]:
        """How many leading blocks of ``blocks`` each holder was sent (holders with none
        are absent). The walk stops at the first block no remaining holder shares."""
        nodes = self._nodes
        depths: dict[str, int] = {}
        alive = nodes.get(blocks[0], _EMPTY) if blocks else _EMPTY
        if not alive:
            return depths
        for depth in range(1, len(blocks)):
            holders = nodes.get(blocks[depth], _EMPTY)
            if holders is alive:
                continue
            for gone in alive - holders:
                depths[gone] = depth
            alive = alive & holders
            if not alive:
                return depths
            alive = self._interned.get(alive, alive)  # so the next identity check works
        for holder in alive:
            depths[holder] = len(blocks)
        return depths

    def longest(self, blocks: Sequence[int]) -> tuple[int, frozenset[str]]:
        """The longest matched depth and the holders that reach it ((0, {}) if none)."""
        depths = self.match(blocks)
        if not depths:
            return 0, _EMPTY
        best = max(depths.values())
        return best, frozenset(h for h, d in depths.items() if d == best)

    def forget(self, holder: str) -> int:
        """Drop ``holder`` from every node (its server restarted or left); nodes nobody
        holds any more are removed. Returns how many nodes it was dropped from.

        A full scan (tens of milliseconds at the default bound): it happens on restarts
        only, and an index kept for it would cost every insert.
        """
        dropped = 0
        empty: list[int] = []
        nodes = self._nodes
        for block, holders in nodes.items():
            if holder in holders:
                dropped += 1
                rest = holders - {holder}
                if rest:
                    nodes[block] = self._intern(rest)  # a value change keeps the order
                else:
                    empty.append(block)
        for block in empty:
            del nodes[block]
        return dropped

    def discard(self, blocks: Iterable[int], holder: str) -> None:
        """Drop ``holder`` from the given blocks only (what feedback proved it lost)."""
        nodes = self._nodes
        for block in blocks:
            holders = nodes.get(block)
            if holders is None or holder not in holders:
                continue
            rest = holders - {holder}
            if rest:
                nodes[block] = self._intern(rest)
            else:
                del nodes[block]

    def holders(self) -> set[str]:
        """Every holder with at least one block (a full scan; for tests and stats)."""
        found: set[str] = set()
        for holders in set(self._nodes.values()):
            found |= holders
        return found

    def _intern(self, holders: frozenset[str]) -> frozenset[str]:
        interned = self._interned.get(holders)
        if interned is not None:
            return interned
        if len(self._interned) >= MAX_INTERNED:
            self._interned.clear()  # only an optimization: nodes keep their own sets
        self._interned[holders] = holders
        return holders

    def _evict(self) -> None:
        nodes = self._nodes
        while len(nodes) > self.max_nodes:
            nodes.popitem(last=False)
            self.evicted += 1
