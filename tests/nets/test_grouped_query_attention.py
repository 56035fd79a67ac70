"""Grouped-query attention variants of KDGQA (https://arxiv.org/abs/2408.08454): agreement with multi-head and
multi-query attention, the key-driven allocation's invariants, DGQA's windows, DDP agreement and digits accuracy."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import Attention

from lit_methods.nets import GroupedQueryAttention, KDGQAViT, key_driven_allocation
from lit_methods.nets.grouped_query_attention import ATTENTION_KINDS
from tests.ddp_helpers import init_gloo, run_distributed
from tests.nets.digits16 import train_and_test

DIM, HEADS = 48, 6


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Tiny nets on a shared CPU: one intra-op thread is faster than several (the conftest restores the count)."""
    torch.set_num_threads(1)


def multi_head_attention() -> Attention:
    torch.manual_seed(0)
    attention = Attention(DIM, num_heads=HEADS, qkv_bias=True).eval()
    with torch.no_grad():
        attention.qkv.bias.normal_()
    return attention


def test_as_many_kv_heads_as_query_heads_is_multi_head_attention() -> None:
    attention = multi_head_attention()
    converted = GroupedQueryAttention.from_multi_head(attention, num_kv_heads=HEADS).eval()
    tokens = torch.randn(3, 10, DIM)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), attention(tokens), atol=1e-5, rtol=1e-5)


def test_one_kv_head_is_multi_query_attention_with_mean_pooled_keys_and_values() -> None:
    """Reference: multi-query attention written out with the mean over heads of the key and value projections
    (pooling over the wrong axis of the fused qkv weight fails this)."""
    attention = multi_head_attention()
    converted = GroupedQueryAttention.from_multi_head(attention, num_kv_heads=1).eval()
    tokens = torch.randn(3, 10, DIM)
    head_dim = DIM // HEADS
    weight, bias = attention.qkv.weight.detach(), attention.qkv.bias.detach()
    projected = (tokens @ weight.T + bias).reshape(3, 10, 3, HEADS, head_dim)
    queries, keys, values = projected.unbind(2)  # (B, N, H, hd)
    pooled_keys, pooled_values = keys.mean(dim=2), values.mean(dim=2)  # (B, N, hd)
    scores = torch.einsum("bqhd,bkd->bhqk", queries, pooled_keys) / head_dim**0.5
    heads = torch.einsum("bhqk,bkd->bqhd", scores.softmax(-1), pooled_values).reshape(3, 10, DIM)
    expected = attention.proj(heads)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), expected, atol=1e-5, rtol=1e-5)


def test_key_driven_allocation_properties_over_200_trials() -> None:
    """Sums to H, non-negative, monotone in the score (a larger-score key head never gets fewer query heads)."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        groups = int(torch.randint(1, 9, (1,), generator=generator))
        heads = int(torch.randint(groups, 17, (1,), generator=generator))
        scores = torch.rand(groups, generator=generator) * 10
        if trial % 4 == 0:  # ties
            scores = scores.round()
        allocation = key_driven_allocation(scores, heads)
        assert allocation.dtype == torch.int64 and allocation.shape == (groups,)
        assert int(allocation.sum()) == heads, (scores, allocation)
        assert (allocation >= 0).all()
        larger = scores[:, None] > scores[None, :]
        assert not (larger & (allocation[:, None] < allocation[None, :])).any(), (scores, allocation)


def test_key_driven_allocation_follows_the_formula() -> None:
    # min-max normalised [1, 2, 3] -> [0, 0.5, 1]; round(6 * [0, 0.5, 1] / 1.5) = [0, 2, 4]
    assert key_driven_allocation(torch.tensor([1.0, 2.0, 3.0]), 6).tolist() == [0, 2, 4]
    assert key_driven_allocation(torch.tensor([5.0, 5.0]), 5).tolist() == [3, 2]  # equal norms: uniform split


def test_kdgqa_gives_more_query_heads_to_the_key_head_with_the_larger_norm() -> None:
    torch.manual_seed(0)
    layer = GroupedQueryAttention(DIM, HEADS, num_kv_heads=3, kind="kdgqa")
    with torch.no_grad():
        layer.k.weight[: DIM // HEADS] *= 20  # key head 0
    layer(torch.randn(4, 10, DIM))
    assert int(layer.allocation.argmax()) == 0 and int(layer.allocation.sum()) == HEADS


@pytest.mark.parametrize("kind", ["dgqa_diff", "dgqa_ema"])
def test_dgqa_allocation_changes_only_on_window_multiples(kind: str) -> None:
    torch.manual_seed(0)
    window = 3
    layer = GroupedQueryAttention(DIM, HEADS, num_kv_heads=3, kind=kind, window_size=window).train()
    allocations = []
    for step in range(12):
        with torch.no_grad():
            layer.k.weight[(step % 3) * 8 : (step % 3 + 1) * 8] *= 1.5  # the key norms drift every step
        layer(torch.randn(4, 10, DIM))
        allocations.append(layer.allocation.tolist())
        if step == 5:  # evaluation leaves the state alone
            state = {name: value.clone() for name, value in layer.state_dict().items()}
            layer.eval()(torch.randn(4, 10, DIM))
            layer.train()
            assert all(torch.equal(value, layer.state_dict()[name]) for name, value in state.items())
    changes = [step for step in range(1, 12) if allocations[step] != allocations[step - 1]]
    assert changes and all(step % window == 0 for step in changes), (changes, allocations)


def _allocate_on_rank(inputs: torch.Tensor) -> list[int]:
    init_gloo()
    torch.manual_seed(0)
    layer = GroupedQueryAttention(DIM, HEADS, num_kv_heads=3, kind="kdgqa").train()
    layer(inputs[int(os.environ["RANK"])])
    return layer.allocation.tolist()


@pytest.mark.ddp
def test_ranks_agree_on_the_allocation_under_ddp() -> None:
    """Each rank sees different tokens (rank 1's lean towards key head 2); without the all-reduce their local
    allocations differ (checked below)."""
    torch.manual_seed(0)
    layer = GroupedQueryAttention(DIM, HEADS, num_kv_heads=3, kind="kdgqa").train()
    torch.manual_seed(1)
    towards_head_2 = layer.k.weight.detach()[16:24].sum(0)
    inputs = torch.stack([torch.randn(4, 10, DIM), torch.randn(4, 10, DIM) + 3 * towards_head_2 / towards_head_2.norm()])
    with torch.no_grad():
        norms = [layer.key_norms(layer.k(x).reshape(4, 10, 3, 8).transpose(1, 2)) for x in inputs]
    local = [key_driven_allocation(n, HEADS).tolist() for n in norms]
    assert local[0] != local[1]
    rank0, rank1 = run_distributed(_allocate_on_rank, inputs)
    assert rank0 == rank1 == key_driven_allocation(norms[0] + norms[1], HEADS).tolist()


def test_pgqa_noise_acts_in_training_only_by_default() -> None:
    torch.manual_seed(0)
    layer = GroupedQueryAttention(DIM, HEADS, num_kv_heads=3, kind="pgqa")
    tokens = torch.randn(2, 10, DIM)
    with torch.no_grad():
        assert not torch.equal(layer.train()(tokens), layer(tokens))
        assert torch.equal(layer.eval()(tokens), layer(tokens))
        layer.perturb_in_eval = True
        assert not torch.equal(layer(tokens), layer(tokens))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "mha"}, "'mha'"),
        ({"num_kv_heads": 4, "kind": "gqa"}, "num_kv_heads.*4"),
        ({"num_kv_heads": 7}, "7"),
        ({"window_size": 0}, "window_size.*0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GroupedQueryAttention(**({"dim": DIM, "num_heads": HEADS, "num_kv_heads": 3} | kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_every_variant_learns_16x16_digits(kind: str) -> None:
    """Width 48, 6 query heads over 3 key/value heads, 1 block, 5 epochs (measured 89-90% for every variant on this
    2-core CPU); untrained (``epochs=0``) each is at chance."""
    torch.manual_seed(0)
    net = KDGQAViT(
        num_classes=10, in_channels=1, img_size=16, patch_size=4, embed_dim=DIM, depth=1, num_heads=HEADS,
        num_kv_heads=3, attention=kind, window_size=20, global_pool="avg",
    )  # fmt: skip
    accuracy = train_and_test(net, epochs=5, batch_size=32)
    assert accuracy > 0.80, accuracy
