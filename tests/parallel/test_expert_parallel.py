"""Expert parallel's dispatch/combine (all_to_all_single) equals one process's MoE experts bit for bit."""

import pytest

from workers import run_ranks


@pytest.mark.timeout(180)
def test_dispatch_combine_equals_one_process_exactly(tmp_path):
    cases = ["random", "sparse", "one_expert", "idle_rank"]
    res = run_ranks("ep_exact", {"cases": cases}, 2, str(tmp_path), timeout=150)
    for case, r in res.items():
        assert r["max_diff"] == [0.0, 0.0, 0.0, 0.0], (case, r)  # output, input grad, both expert weight grads
    assert res["sparse"]["tokens_per_expert"][-1] == 0  # an expert no rank sends a token to
    one = res["one_expert"]["tokens_per_expert"]
    assert one[0] == 2 * 24  # every token of both ranks picked expert 0
    assert sum(res["idle_rank"]["tokens_per_expert"][4:]) == 0  # rank 1 owns experts 4-7 and receives nothing
