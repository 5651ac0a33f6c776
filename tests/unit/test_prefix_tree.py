"""The prefix tree: chained block hashes, longest match, LRU eviction, memory bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.scheduling.prefix_tree import BLOCK_CHARS, PrefixTree, chain_hashes

TEXT = "".join(f"block {i:02d} " + "x" * (BLOCK_CHARS - 9) for i in range(10))


def test_chain_hashes_cover_only_whole_blocks() -> None:
    assert len(TEXT) == 10 * BLOCK_CHARS
    assert len(chain_hashes(TEXT)) == 10
    assert len(chain_hashes(TEXT + "tail")) == 10
    assert chain_hashes("short") == []


def test_chain_hashes_of_a_prefix_are_a_prefix_of_the_chain() -> None:
    full = chain_hashes(TEXT)
    assert chain_hashes(TEXT[: 4 * BLOCK_CHARS + 10]) == full[:4]


def test_chain_hashes_name_the_whole_prefix_not_just_the_block() -> None:
    other = "y" * BLOCK_CHARS + TEXT[BLOCK_CHARS:]  # same blocks 1..9, different block 0
    assert not set(chain_hashes(TEXT)) & set(chain_hashes(other))


def test_chain_hashes_seed_keeps_models_apart_and_max_blocks_caps_the_chain() -> None:
    assert chain_hashes(TEXT, seed="a") != chain_hashes(TEXT, seed="b")
    assert chain_hashes(TEXT, max_blocks=3) == chain_hashes(TEXT)[:3]
    assert len(chain_hashes(TEXT, block_chars=32)) == 20
    with pytest.raises(ValueError):
        chain_hashes(TEXT, block_chars=0)


def test_match_gives_each_holder_its_longest_shared_prefix() -> None:
    tree = PrefixTree()
    full = chain_hashes(TEXT)
    tree.insert(full[:3], "a")
    tree.insert(full[:7], "b")
    tree.insert(chain_hashes("z" * 640), "c")  # shares nothing
    assert tree.match(full) == {"a": 3, "b": 7}
    assert tree.longest(full) == (7, frozenset({"b"}))
    assert tree.match(full[:2]) == {"a": 2, "b": 2}


def test_match_stops_where_the_prompts_diverge() -> None:
    tree = PrefixTree()
    tree.insert(chain_hashes(TEXT), "a")
    diverged = TEXT[: 5 * BLOCK_CHARS] + "q" * (5 * BLOCK_CHARS)
    assert tree.match(chain_hashes(diverged)) == {"a": 5}
    assert tree.match(chain_hashes("q" * 640)) == {}
    assert tree.match([]) == {}
    assert tree.longest(chain_hashes("q" * 640)) == (0, frozenset())


def test_insert_is_idempotent_and_adds_holders_to_shared_blocks() -> None:
    tree = PrefixTree()
    full = chain_hashes(TEXT)
    tree.insert(full, "a")
    tree.insert(full, "a")
    tree.insert(full[:4], "b")
    assert len(tree) == 10
    assert tree.holders_of(full[0]) == {"a", "b"}
    assert tree.holders_of(full[9]) == {"a"}
    assert tree.holders() == {"a", "b"}


def test_eviction_drops_the_least_recently_used_chain_first() -> None:
    tree = PrefixTree(max_nodes=10)
    old, new = chain_hashes("o" * 320), chain_hashes("n" * 320)
    tree.insert(old, "a")
    tree.insert(new, "a")
    tree.insert(chain_hashes("p" * 64), "a")  # one more block than fits
    assert len(tree) == 10
    assert tree.evicted == 1
    assert tree.match(new) == {"a": 5}
    assert tree.match(old) == {"a": 4}  # trimmed at its leaf, still matched from the root


def test_eviction_trims_leaves_before_their_shared_ancestors() -> None:
    tree = PrefixTree(max_nodes=8)
    shared = "s" * (2 * BLOCK_CHARS)
    first, second = chain_hashes(shared + "a" * 192), chain_hashes(shared + "b" * 192)
    tree.insert(first, "x")
    tree.insert(second, "y")  # 5 + 3 new blocks: exactly full
    assert len(tree) == 8
    tree.insert(chain_hashes("c" * 128), "z")  # evicts two of first's own leaves
    assert tree.match(first) == {"x": 3, "y": 2}
    assert tree.match(second) == {"x": 2, "y": 5}


def test_a_prompt_longer_than_the_bound_keeps_its_leading_blocks() -> None:
    tree = PrefixTree(max_nodes=4)
    full = chain_hashes(TEXT)
    tree.insert(full, "a")
    assert len(tree) == 4
    assert tree.match(full) == {"a": 4}


def test_forget_drops_a_holder_everywhere_and_empty_nodes_with_it() -> None:
    tree = PrefixTree()
    full = chain_hashes(TEXT)
    tree.insert(full, "a")
    tree.insert(full[:4], "b")
    assert tree.forget("a") == 10
    assert len(tree) == 4
    assert tree.match(full) == {"b": 4}
    assert tree.forget("a") == 0
    assert tree.forget("b") == 4
    assert len(tree) == 0


def test_discard_drops_a_holder_from_given_blocks_only() -> None:
    tree = PrefixTree()
    full = chain_hashes(TEXT)
    tree.insert(full, "a")
    tree.insert(full[:2], "b")
    tree.discard(full[1:], "a")
    assert tree.match(full) == {"a": 1, "b": 2}
    assert len(tree) == 2


def test_a_tree_needs_room_for_one_node() -> None:
    with pytest.raises(ValueError):
        PrefixTree(max_nodes=0)


texts = st.text(alphabet="ab", min_size=0, max_size=12).map(lambda s: s * 40)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), texts, st.sampled_from("pqr")),
        st.tuples(st.just("forget"), st.just(""), st.sampled_from("pqr")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(bound=st.integers(min_value=1, max_value=12), ops=operations)
def test_the_tree_never_exceeds_its_node_bound(bound: int, ops: list[tuple[str, str, str]]) -> None:
    tree = PrefixTree(max_nodes=bound)
    for op, text, holder in ops:
        blocks = chain_hashes(text, block_chars=8)
        if op == "insert":
            tree.insert(blocks, holder)
            # what was just sent is matched in full when it fits the bound
            if len(blocks) <= bound:
                assert tree.match(blocks).get(holder, 0) == len(blocks) or not blocks
        else:
            tree.forget(holder)
            assert holder not in tree.holders()
        assert len(tree) <= bound
        for other, depth in tree.match(blocks).items():
            assert 0 < depth <= len(blocks)
            assert all(other in tree.holders_of(b) for b in blocks[:depth])
