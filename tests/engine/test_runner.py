"""The runner's block tables, kept between steps: each row always equals its sequence's blocks."""
import torch

from engine.runner.batch import BlockTables


def test_block_table_rows_follow_growth_preemption_and_reuse():
    tables = BlockTables(max_blocks=8)
    lists = {f"s{i}": [i, 100 + i] for i in range(70)}  # more sequences than the first 64 rows
    rows = {sid: tables.row(sid, ids) for sid, ids in lists.items()}
    assert len(set(rows.values())) == 70

    def check():
        for sid, ids in lists.items():
            assert tables.table[tables.rows[sid][0], :len(ids)].tolist() == ids

    check()
    lists["s3"].append(7)  # a new block while it decodes
    tables.row("s3", lists["s3"])
    lists["s5"] = [9]  # preempted and readmitted: a new, shorter list
    tables.row("s5", lists["s5"])
    check()
    tables.release(["s1", "s2"])
    del lists["s1"], lists["s2"]
    lists["new"] = [42, 43, 44]
    assert tables.row("new", lists["new"]) in (rows["s1"], rows["s2"])  # a freed row is reused
    check()
    assert tables.table.dtype == torch.int64
