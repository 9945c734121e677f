"""pretrain_gpt --fmoefy with real megatron-core over gloo, on each layout of the issue:
2 processes EP=2; 4 processes TP=2 with sequence parallel x EP=2; PP=2 x EP=2; DP=4 with EP=2
(expert-data-parallel replicas). Each trains a few iterations and checks the loss, the experts,
the dense weights and the gradient norm across ranks (ptg_workers.py)."""
import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from tests.dist_utils import run_workers  # noqa: E402
from tests.megatron import ptg_workers as w  # noqa: E402

LAYOUTS = {
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "tp2-sp-ep2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--expert-model-parallel-size", "2"]),
    "pp2-ep2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                    "--global-batch-size", "8"]),
    "dp4-ep2": (4, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_trains_and_stays_consistent(layout):
    world, extra = LAYOUTS[layout]
    out = run_workers(w.train_and_check, world, timeout=420, args=(extra, 8), threads_per_worker=1)
    assert len({o["norm"] for o in out}) == 1
