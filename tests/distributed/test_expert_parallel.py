"""Expert parallelism over gloo against a one-process reference that holds all global experts.

Layouts: world 2 (EP=2), and world 4 as EP=2 x DP=2 (each expert has a replica in the other
data-parallel pair). Bodies in ep_workers.py; a worker that fails, dies or hangs fails the test.
"""
import pytest

from tests.dist_utils import run_workers
from tests.distributed import ep_workers as w


@pytest.mark.parametrize("world,ep,zero_rank", [
    (2, 2, None),
    (2, 2, 1),  # one rank has no tokens at all
    (4, 2, None),
    (4, 2, 0),
    (4, 4, 3),
])
def test_forward_backward_matches_reference(world, ep, zero_rank):
    out = run_workers(w.forward_backward, world, timeout=240, args=(ep, 2, zero_rank))
    assert len({o["norm"] for o in out}) == 1
    if zero_rank is not None:
        assert out[zero_rank]["tokens"] == 0


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_sgd_steps_match_reference(world, ep):
    run_workers(w.sgd_steps, world, timeout=240, args=(ep, 2, 5))


def test_slice_group_matches_unsliced():
    run_workers(w.slice_group_matches_full, 2, timeout=120, args=())


@pytest.mark.parametrize("cap", [0, 1, 3, 100])
def test_capacity_is_enforced_over_all_ranks(cap):
    run_workers(w.capacity_is_global, 2, timeout=120, args=(2, cap))
