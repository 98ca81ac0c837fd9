"""A domain's mapping table against a plain model: whole mappings only, no overlaps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viommu.device.mappings import Mapping, MappingTable, OverlapError, SplitError


def test_lookup_finds_the_mapping_containing_an_address() -> None:
    table = MappingTable()
    table.add(Mapping(0x1000, 0x1FFF, 0x8000, 3))
    table.add(Mapping(0x4000, 0x4FFF, 0x9000, 1))
    assert table.lookup(0x1FFF).phys_start == 0x8000
    assert table.lookup(0x2000) is None
    assert table.lookup(0x4000).flags == 1


def test_add_rejects_any_overlap() -> None:
    table = MappingTable()
    table.add(Mapping(0x1000, 0x1FFF, 0, 0))
    for start, end in [(0x0, 0x1000), (0x1FFF, 0x2FFF), (0x1800, 0x18FF), (0x0, 0xFFFF)]:
        with pytest.raises(OverlapError):
            table.add(Mapping(start, end, 0, 0))
    assert len(table) == 1


def test_remove_range_refuses_to_split_and_removes_nothing() -> None:
    table = MappingTable()
    table.add(Mapping(0x0, 0xFFF, 0, 0))
    table.add(Mapping(0x1000, 0x2FFF, 0, 0))
    with pytest.raises(SplitError):
        table.remove_range(0x0, 0x1FFF)
    assert len(table) == 2


spans = st.tuples(st.integers(0, 63), st.integers(0, 7)).map(lambda t: (t[0], t[0] + t[1]))


@given(st.lists(st.tuples(st.sampled_from(["add", "remove"]), spans), max_size=80))
def test_table_matches_a_plain_model(ops) -> None:
    table, model = MappingTable(), []
    for op, (start, end) in ops:
        if op == "add":
            clash = any(s <= end and start <= e for s, e in model)
            try:
                table.add(Mapping(start, end, start * 2, 0))
                assert not clash
                model.append((start, end))
            except OverlapError:
                assert clash
        else:
            touched = [(s, e) for s, e in model if s <= end and start <= e]
            split = any(s < start or e > end for s, e in touched)
            try:
                removed = table.remove_range(start, end)
                assert not split
                assert sorted((m.virt_start, m.virt_end) for m in removed) == sorted(touched)
                model = [m for m in model if m not in touched]
            except SplitError:
                assert split
        assert [(m.virt_start, m.virt_end) for m in table] == sorted(model)
        for addr in range(0, 72, 5):
            hit = table.lookup(addr)
            expected = next(((s, e) for s, e in model if s <= addr <= e), None)
            assert (None if hit is None else (hit.virt_start, hit.virt_end)) == expected
