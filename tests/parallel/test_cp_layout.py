"""``parallel.cp`` in the layout rules (pure Python, no processes)."""

from __future__ import annotations

import pytest

from rynnscale.parallel.layout import LayoutError, ParallelLayout, check_layout_keys


def test_cp_layout_sizes_and_ranks():
    lay = ParallelLayout.resolve(8, dp_replicate=1, dp_shard=-1, ep=2, num_experts=8, cp=2)
    assert (lay.dp_shard, lay.cp, lay.fsdp, lay.edp_shard) == (4, 2, 8, 4)
    assert lay.data_world_size == lay.dp_size == 4
    assert [lay.data_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [lay.cp_rank(r) for r in range(8)] == [0, 1] * 4
    assert lay.as_dict() == {"dp_replicate": 1, "dp_shard": 4, "ep": 2, "cp": 2}
    assert ParallelLayout.resolve(4).as_dict() == {"dp_replicate": 1, "dp_shard": 4, "ep": 1}  # as before CP
    # EP may span the CP ranks: 2 processes, cp=2, ep=2 (dp_shard 1)
    assert ParallelLayout.resolve(2, ep=2, num_experts=8, cp=2).edp_shard == 1


@pytest.mark.parametrize("world,kw,match", [
    (4, dict(cp=3), "parallel.cp = 3 does not divide the world size 4"),
    (4, dict(dp_shard=4, cp=2), "must equal the world size"),
    (8, dict(ep=8, cp=2, dp_shard=2, num_experts=8), "must divide parallel.dp_shard x parallel.cp = 4"),
    (2, dict(cp=0), "parallel.cp=0 must be >= 1"),
])
def test_impossible_cp_layouts_name_the_keys(world, kw, match):
    with pytest.raises(LayoutError, match=match):
        ParallelLayout.resolve(world, **kw)


def test_recipe_rules_know_cp():
    check_layout_keys(1, 1, ep=2, num_experts=8, cp=2)
    with pytest.raises(LayoutError, match="parallel.cp"):
        check_layout_keys(1, 1, ep=4, num_experts=8, cp=2)
