"""Batch selection (service.batching.select_batch) as a pure function: waiting items in, indices out; no threads."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from service.batching import BatchLimits, select_batch


@dataclass(frozen=True)
class Item:
    length: int
    abandoned: bool = False
    prompt: int = -1  # items with the same prompt share their first PROMPT tokens; -1: shares with nobody
    tag: int = 0  # makes the ids of an item its own after the prompt

    @property
    def ids(self) -> list[int]:
        """``length`` token ids: the prompt's PROMPT tokens, then ids of this item's own."""
        head = [self.prompt] * min(PROMPT, self.length) if self.prompt >= 0 else []
        return head + [10_000 * (self.tag + 1) + k for k in range(self.length - len(head))]


def items(*lengths: int, abandoned: tuple[int, ...] = ()) -> list[Item]:
    return [Item(n, i in abandoned) for i, n in enumerate(lengths)]


PROMPT = 100


def limits(tokens: int = 2048, size: int = 32, overhead: int = 0, group: int = 0, pads: bool = True) -> BatchLimits:
    return BatchLimits(
        max_batch_tokens=tokens, max_batch_size=size, overhead_tokens=overhead, group_prefix_tokens=group, pads=pads
    )


def grouped(*specs: tuple[int, int], abandoned: tuple[int, ...] = ()) -> list[Item]:
    """Items from (length, prompt) pairs, oldest first."""
    return [Item(n, i in abandoned, prompt, i) for i, (n, prompt) in enumerate(specs)]


def test_nothing_live_selects_nothing():
    assert select_batch([], limits()) == []
    assert select_batch(items(5, 6, abandoned=(0, 1)), limits()) == []


def test_everything_fits_in_one_batch_ordered_by_length_then_age():
    assert select_batch(items(30, 10, 20, 10), limits()) == [1, 3, 2, 0]


def test_the_oldest_item_is_in_even_when_it_is_the_longest():
    # Shortest-first would take the three short ones and leave the long oldest item waiting.
    chosen = select_batch(items(100, 5, 5, 5), limits(tokens=200))
    assert 0 in chosen
    assert chosen == [3, 0]  # width 100 x 2 = 200 tokens: one neighbour fits, the nearest in length (then newest)


def test_the_oldest_item_alone_may_exceed_the_token_budget():
    assert select_batch(items(500, 4, 4), limits(tokens=64)) == [0]


def test_neighbours_by_length_are_taken_while_padded_tokens_fit():
    # Oldest is 10 tokens; candidates 9, 11, 40. Budget 40 padded tokens: 11 x 3 = 33 fits, 40 x 4 does not.
    chosen = select_batch(items(10, 40, 9, 11), limits(tokens=40))
    assert sorted(chosen) == [0, 2, 3]
    lengths = [items(10, 40, 9, 11)[i].length for i in chosen]
    assert max(lengths) * len(chosen) <= 40


def test_the_neighbour_adding_less_padding_goes_first():
    # Oldest 10; left neighbour 2 (adds 8 padding), right neighbour 12 (widens one item by 2): the right is taken.
    assert select_batch(items(10, 2, 12), limits(size=2)) == [0, 2]
    # Left 9 adds 1 padding, right 14 adds 4: the left is taken.
    assert select_batch(items(10, 9, 14), limits(size=2)) == [1, 0]


def test_max_batch_size_caps_the_count():
    chosen = select_batch(items(*([8] * 50)), limits(size=32))
    assert len(chosen) == 32 and 0 in chosen


def test_abandoned_items_are_never_chosen_and_the_oldest_live_one_leads():
    chosen = select_batch(items(100, 7, 7, 50, abandoned=(0, 2)), limits(tokens=100))
    assert 0 not in chosen and 2 not in chosen
    assert 1 in chosen  # the oldest live item
    assert chosen == [1, 3]


def test_overhead_stops_growth_when_padding_costs_more_than_a_forward():
    # Four 4-token items and one of 200. Without overhead the long one joins (200 x 5 = 1000 fits the budget); with
    # a per-forward overhead of 16 tokens, padding every item to 200 costs more than a forward of its own: it waits.
    assert select_batch(items(4, 4, 4, 4, 200), limits(tokens=1000)) == [0, 1, 2, 3, 4]
    assert select_batch(items(4, 4, 4, 4, 200), limits(tokens=1000, overhead=16)) == [0, 1, 2, 3]
    # Items of equal length always improve efficiency and keep joining.
    assert select_batch(items(4, 4, 4), limits(tokens=1000, overhead=16)) == [0, 1, 2]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=60),
    dead=st.sets(st.integers(min_value=0, max_value=59)),
    tokens=st.integers(min_value=1, max_value=4096),
    size=st.integers(min_value=1, max_value=40),
    overhead=st.sampled_from([0, 8, 64]),
)
def test_selection_invariants(lengths, dead, tokens, size, overhead):
    waiting = items(*lengths, abandoned=tuple(dead))
    chosen = select_batch(waiting, limits(tokens=tokens, size=size, overhead=overhead))
    live = [i for i, item in enumerate(waiting) if not item.abandoned]
    if not live:
        assert chosen == []
        return
    assert live[0] in chosen  # the oldest live item always goes
    assert len(set(chosen)) == len(chosen) <= size
    assert all(not waiting[i].abandoned for i in chosen)
    if len(chosen) > 1:  # only a lone oldest item may exceed the token budget
        assert max(waiting[i].length for i in chosen) * len(chosen) <= tokens
    assert [waiting[i].length for i in chosen] == sorted(waiting[i].length for i in chosen)


def test_the_oldest_item_goes_with_its_prefix_siblings_first():
    # Oldest: prompt 1. Items of another prompt with the same length would pad less, but the siblings go first.
    waiting = grouped((140, 1), (140, 2), (140, 2), (120, 1), (150, 1), (140, 2))
    # Group 1 costs 100 + 3 x 50 = 250 tokens; the next oldest item would add at least 140.
    assert select_batch(waiting, limits(tokens=300, group=16)) == [0, 3, 4]
    # With more room, the next group joins, cut where the budget ends (100 + 2 x 40 = 180 more).
    assert select_batch(waiting, limits(tokens=450, group=16)) == [0, 1, 2, 3, 4]
    # Without grouping, the length rule takes the equal-length neighbours.
    assert select_batch(waiting, limits(tokens=450)) == [0, 1, 2]


def test_a_group_costs_its_prefix_once():
    # 8 texts of 145 tokens sharing 100: 100 + 8 x 45 = 460 tokens, within 1024 (8 x 145 padded would not be).
    waiting = grouped(*[(145, 7)] * 8)
    assert select_batch(waiting, limits(tokens=1024, group=16)) == list(range(8))
    assert len(select_batch(waiting, limits(tokens=1024))) == 7


def test_a_forward_that_packs_counts_each_suffix_not_the_longest():
    # A GRPO group with one long reply: 100 + 5 x 200 = 1100 padded, 100 + 200 + 4 x 20 = 380 packed.
    waiting = grouped((300, 4), (120, 4), (120, 4), (120, 4), (120, 4))
    assert select_batch(waiting, limits(tokens=1024, group=16)) == [0, 1, 2, 3]
    assert select_batch(waiting, limits(tokens=1024, group=16, pads=False)) == [0, 1, 2, 3, 4]
    # Items without siblings cost their own lengths, not the longest times the count: 380 + 300 + 100 = 780.
    more = [*waiting, *grouped((300, -1), (100, -1))]
    assert select_batch(more, limits(tokens=800, group=16, pads=False)) == [0, 1, 2, 3, 4, 5, 6]
    assert select_batch(more, limits(tokens=800, group=16)) == [0, 1, 2]


def test_whole_groups_follow_in_age_order_while_they_fit():
    waiting = grouped((130, 1), (60, 9), (130, 2), (130, 1), (130, 2), (130, 3), (130, 3))
    # Group 1 (2 x 30 + 100 = 160), the lone 60 (60), group 2 (160): 380; group 3 would make 540 > 400.
    assert select_batch(waiting, limits(tokens=400, group=16)) == [0, 1, 2, 3, 4]
    # A group cut by the item cap ends the batch.
    assert select_batch(waiting, limits(size=3, group=16)) == [0, 1, 3]


def test_grouping_skips_abandoned_items_and_falls_back_without_siblings():
    waiting = grouped((140, 1), (140, 1), (139, 2), (141, 1), abandoned=(1,))
    assert select_batch(waiting, limits(tokens=300, group=16)) == [0, 3]  # 100 + 2 x 41, and 139 would not fit
    alone = grouped((140, 1), (139, 2), (141, 3))
    assert select_batch(alone, limits(tokens=1000, group=16)) == select_batch(alone, limits(tokens=1000))


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.integers(min_value=1, max_value=300), st.integers(min_value=-1, max_value=3)),
        min_size=1,
        max_size=40,
    ),
    dead=st.sets(st.integers(min_value=0, max_value=39)),
    tokens=st.integers(min_value=1, max_value=4096),
    size=st.integers(min_value=1, max_value=40),
    pads=st.booleans(),
)
def test_grouped_selection_invariants(specs, dead, tokens, size, pads):
    waiting = grouped(*specs, abandoned=tuple(dead))
    chosen = select_batch(waiting, limits(tokens=tokens, size=size, group=16, pads=pads))
    live = [i for i, item in enumerate(waiting) if not item.abandoned]
    if not live:
        assert chosen == []
        return
    assert live[0] in chosen
    assert len(set(chosen)) == len(chosen) <= size
    assert all(not waiting[i].abandoned for i in chosen)
