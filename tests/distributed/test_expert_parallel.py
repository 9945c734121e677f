"""Expert parallelism over gloo against a one-process reference that holds all global experts.

Layouts: world 2 (EP=2), and world 4 as EP=2 x DP=2 (each expert has a replica in the other
data-parallel pair). Bodies in ep_workers.py; a worker that fails, dies or hangs fails the test.
"""
import pytest

from tests.dist_utils import run_workers
from tests.distributed import ep_workers as w


@pytest.mark.parametrize("world,ep,zero_rank,e_local,overlap", [
    (2, 2, None, 2, "1"),
    (2, 2, 1, 2, "1"),  # one rank has no tokens at all
    (4, 2, None, 2, "1"),
    (4, 2, 0, 2, "1"),
    (4, 4, 3, 2, "1"),  # three peers per worker
    (2, 2, None, 1, "1"),  # one local expert: the overlap's half A is empty
    (4, 4, None, 3, "1"),  # halves of 1 and 2 experts
    (2, 2, None, 2, "0"),  # the all-to-all path
    (4, 2, 0, 2, "0"),
    (4, 4, 3, 3, "0"),
])
def test_forward_backward_matches_reference(world, ep, zero_rank, e_local, overlap):
    """FMOE_EP_OVERLAP=1 (default) runs ep_overlap's point-to-point schedule, 0 the all-to-alls
    of comm.global_scatter / global_gather; each worker checks which one its graph went through."""
    out = run_workers(w.forward_backward, world, timeout=240,
                      args=(ep, e_local, zero_rank, overlap))
    assert len({o["norm"] for o in out}) == 1
    if zero_rank is not None:
        assert out[zero_rank]["tokens"] == 0


@pytest.mark.parametrize("switches,variant", [("mixed", "plain"), ("unfused-last", "plain"),
                                              ("mixed", "no-check"), ("1", "no-check")])
def test_ranks_agree_on_the_exchange_path(switches, variant):
    """FMOE_EP_OVERLAP or FMOE_FUSED_EXPERTS set differently on different ranks: every rank takes
    the all-to-alls (they hung: one rank on the overlapped schedule, the other in the
    all-to-all), agreed through the flag the count exchange carries, with the finiteness check
    on or off (no-check: the flag then says only which paths the rank can take)."""
    run_workers(w.forward_backward, 2, timeout=120, args=(2, 2, None, switches, "fp32", variant))


@pytest.mark.parametrize("overlap", ["1", "0"])
def test_forward_backward_bf16(overlap):
    run_workers(w.forward_backward, 2, timeout=240, args=(2, 3, None, overlap, "bf16"))


@pytest.mark.parametrize("variant,world,overlap", [
    ("no-bias", 2, "1"), ("no-bias", 2, "0"), ("swiglu", 2, "1"), ("swiglu", 4, "1")])
def test_expert_variants(variant, world, overlap):
    """Experts without biases (through the overlapped schedule and the all-to-alls) and gated
    experts (which take the all-to-alls), against the one-process reference."""
    run_workers(w.forward_backward, world, timeout=240,
                args=(2, 2, None, overlap, "fp32", variant))


@pytest.mark.parametrize("world,overlap", [(2, "0"), (3, "0"), (2, "1")])
def test_double_backward(world, overlap):
    assert run_workers(w.double_backward, world, timeout=120, args=(overlap,)) == [True] * world


@pytest.mark.parametrize("world", [2, 4])
def test_misconfigured_layouts_are_refused(world):
    assert run_workers(w.misconfigured_layouts, world, timeout=120, args=()) == [True] * world


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_overlap_matches_all_to_all_with_dropped_slots(dtype):
    run_workers(w.overlap_matches_all_to_all, 2, timeout=120, args=(dtype,))


@pytest.mark.parametrize("world,ep,overlap", [(2, 2, "1"), (4, 2, "1"), (2, 2, "0")])
def test_sgd_steps_match_reference(world, ep, overlap):
    run_workers(w.sgd_steps, world, timeout=240, args=(ep, 2, 5, overlap))


@pytest.mark.parametrize("world,ep,bad_ranks,overlap", [
    (2, 2, (1,), "1"),
    (2, 2, (0, 1), "1"),
    (2, 2, (0,), "0"),
    (4, 2, (3,), "1"),  # the other expert-parallel pair goes on
])
def test_nonfinite_input_on_one_rank_stops_its_group(world, ep, bad_ranks, overlap):
    out = run_workers(w.nonfinite_input_stops_every_rank, world, timeout=120,
                      args=(ep, bad_ranks, overlap))
    assert [o["raised"] for o in out] == [any(r // ep == rank // ep for r in bad_ranks)
                                          for rank in range(world)]


@pytest.mark.parametrize("world,ep,schedule", [
    (2, 2, "one_pass"), (4, 2, "passes"), (4, 2, "kept"), (2, 2, "dict")])
def test_auto_allreduce_with_gradient_accumulation(world, ep, schedule):
    """Expert gradients are divided by the data-parallel size, which is not idempotent: a second
    reduction of an already reduced gradient divided it again (each backward pass reduced the
    whole accumulated gradient, and one pass over two forwards reduced it twice)."""
    run_workers(w.auto_allreduce_accumulates, world, timeout=240, args=(ep, schedule))


def test_overridden_expert_fn_is_used_under_expert_parallel():
    run_workers(w.overridden_expert_fn_is_used, 2, timeout=120, args=())


@pytest.mark.parametrize("zero_rank", [None, 1])
def test_nested_input_under_expert_parallel(zero_rank):
    run_workers(w.nested_input_matches_one_process, 2, timeout=120, args=(zero_rank,))


def test_allreduce_takes_fastmoe_arguments():
    run_workers(w.fastmoe_allreduce_arguments, 2, timeout=120, args=())


def test_gradients_missing_on_some_ranks_count_as_zero():
    run_workers(w.gradients_missing_on_some_ranks, 2, timeout=120, args=())


@pytest.mark.parametrize("gate_over_world", [False, True])
def test_slice_group_matches_unsliced(gate_over_world):
    run_workers(w.slice_group_matches_full, 2, timeout=120, args=(gate_over_world,))


def test_slice_group_ignores_the_scores_of_dropped_slots():
    run_workers(w.nan_scores_of_dropped_slots_under_slice_group, 2, timeout=120, args=())


@pytest.mark.parametrize("cap", [0, 1, 3, 100])
def test_capacity_is_enforced_over_all_ranks(cap):
    run_workers(w.capacity_is_global, 2, timeout=120, args=(2, cap))


@pytest.mark.parametrize("cls", ["dc", "switch"])
@pytest.mark.parametrize("counts,factor", [([4, 0], 1.0), ([8, 2], 1.0), ([9, 3], 0.5),
                                           ([0, 5, 2], 0.6)])
def test_capacity_follows_the_mean_load_over_all_ranks(cls, counts, factor):
    dropped = run_workers(w.capacity_follows_the_mean_load, len(counts), timeout=120,
                          args=(cls, counts, factor))
    if factor < 1:
        assert sum(dropped) > 0, "the case should drop slots"


@pytest.mark.parametrize("e_local,top_k,counts", [(2, 2, [10, 10]), (2, 1, [4, 16]),
                                                  (1, 2, [12, 0]), (2, 3, [5, 9, 3]),
                                                  (1, 1, [0, 6, 2])])
def test_swipe_gate_balances_like_its_rule(e_local, top_k, counts):
    moved = run_workers(w.swipe_matches_brute_force, len(counts), timeout=120,
                        args=(e_local, top_k, counts))
    assert moved[0] > 0, "the case should move rows"


def test_overlap_switch(monkeypatch):
    """FMOE_EP_OVERLAP: on by default, off with 0, and any other value is an error that names the
    variable and the allowed values."""
    from fastmoe_megatron import ep_overlap

    monkeypatch.delenv("FMOE_EP_OVERLAP", raising=False)
    assert ep_overlap.enabled()
    monkeypatch.setenv("FMOE_EP_OVERLAP", "0")
    assert not ep_overlap.enabled()
    monkeypatch.setenv("FMOE_EP_OVERLAP", "yes")
    with pytest.raises(ValueError, match="FMOE_EP_OVERLAP='yes' is not valid; allowed values: 0, 1"):
        ep_overlap.enabled()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_takes_the_same_exchange_path(world):
    assert run_workers(w.exchange_path_is_agreed, world, timeout=120, args=()) == [True] * world
