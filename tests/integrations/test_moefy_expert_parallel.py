"""moefy with experts spread over 2 gloo workers equals the one-process upcycled model: outputs,
and the gradients after DistributedGroupedDataParallel's reduction (nn.TransformerEncoder); outputs
and segment memory (Transformer-XL). Bodies in moefy_workers.py."""
import pytest

from tests.dist_utils import run_workers
from tests.integrations import moefy_workers as w


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_expert_parallel_matches_one_process(norm_first):
    run_workers(w.encoder_matches_one_process, 2, timeout=120, args=(norm_first,))


def test_norm_between_the_linears_is_reduced_as_dense():
    run_workers(w.norm_in_the_chain_matches_one_process, 2, timeout=120)


def test_plain_moefy_is_the_same_at_any_ep_size():
    run_workers(w.plain_moefy_is_the_same_at_any_ep_size, 2, timeout=120)


def test_transformer_xl_expert_parallel_matches_one_process():
    pytest.importorskip("transformers")
    run_workers(w.transformer_xl_matches_one_process, 2, timeout=180)


def test_transformer_xl_not_upcycled_is_the_same_at_any_ep_size():
    pytest.importorskip("transformers")
    run_workers(w.transformer_xl_plain_is_the_same_at_any_ep_size, 2, timeout=180)
