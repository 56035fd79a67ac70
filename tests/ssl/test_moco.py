"""MoCo v2: InfoNCE against the queue, the momentum schedule, EMA updates only on optimizer steps, the queue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.ssl import MoCoV2, cosine_momentum
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer


def _moco(**kwargs) -> MoCoV2:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    return MoCoV2(net, **(dict(projection_hidden_dim=16, projection_dim=8, queue_size=32) | kwargs))


def test_momentum_schedule_rises_from_base_to_final_along_a_cosine():
    values = [cosine_momentum(step, 100, 0.99) for step in range(101)]
    assert values[0] == pytest.approx(0.99) and values[-1] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_momentum(30, 100, 0.999, 0.999) == pytest.approx(0.999)


def test_info_nce_equals_a_naive_computation():
    model = _moco(temperature=0.2)
    q, k = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    expected = 0.0
    for i in range(4):
        scores = [float(q[i] @ k[i])] + [float(q[i] @ neg) for neg in model.queue]
        expected -= math.log(math.exp(scores[0] / 0.2) / sum(math.exp(s / 0.2) for s in scores))
    assert model.info_nce(q, k).item() == pytest.approx(expected / 4, rel=1e-5)


def test_queue_is_a_ring_buffer_of_the_latest_keys():
    model = _moco(queue_size=5)
    first, second = torch.randn(3, 8), torch.randn(4, 8)
    model.enqueue(first)
    model.enqueue(second)
    assert int(model.queue_pointer) == 2
    torch.testing.assert_close(model.queue[:2], second[2:])
    torch.testing.assert_close(model.queue[2:], torch.cat([first[2:], second[:2]]))


class RecordTargets(Callback):
    """Snapshot of one momentum-encoder weight before every training batch."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append(next(pl_module.momentum_backbone.parameters()).detach().clone())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_momentum_encoder_is_an_ema_updated_once_per_optimizer_step(tmp_path, accumulate):
    model = _moco(base_momentum=0.9, final_momentum=0.9)
    online_start = next(model.backbone.parameters()).detach().clone()
    record = RecordTargets()
    trainer = cpu_trainer(
        max_steps=3,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        callbacks=[record],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, fast_loader=False, ssl_views=2, num_workers=0))
    snapshots = [*record.snapshots, next(model.momentum_backbone.parameters()).detach().clone()]
    changes = [not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:])]
    assert len(changes) == 3 * accumulate and sum(changes) == 3  # one EMA update per optimizer step
    assert changes == ([False] * (accumulate - 1) + [True]) * 3  # after the last batch of each accumulation
    torch.testing.assert_close(snapshots[0], online_start)  # the target starts as a copy of the online encoder


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(queue_size=0), "queue_size.*0"),
        (dict(temperature=0.0), "temperature.*0.0"),
        (dict(base_momentum=1.1), "1.1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _moco(**kwargs)


def test_zero_momentum_copies_the_online_encoder_and_one_freezes_it(tmp_path):
    for tau in (0.0, 1.0):
        model = _moco(base_momentum=tau, final_momentum=tau)
        start = [p.detach().clone() for p in model.momentum_backbone.parameters()]
        trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, fast_loader=False, ssl_views=2, num_workers=0))
        expected = list(model.backbone.parameters()) if tau == 0.0 else start
        for target, reference in zip(model.momentum_backbone.parameters(), expected):
            torch.testing.assert_close(target, reference.detach())


class RecordingMoCo(MoCoV2):
    """MoCo v2 that keeps the keys this rank computed in its last step (before they are gathered)."""

    def enqueue(self, keys: torch.Tensor) -> None:
        self.local_keys = keys.detach().clone()
        super().enqueue(keys)


def _recording_moco() -> RecordingMoCo:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    return RecordingMoCo(net, projection_hidden_dim=16, projection_dim=8, queue_size=40)


def _queue_after_one_ddp_step(tmp_dir: str) -> tuple[np.ndarray, np.ndarray, int]:
    model = _recording_moco()
    trainer = cpu_trainer(devices=2, strategy="ddp", max_steps=1, limit_val_batches=0, default_root_dir=tmp_dir)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=8, fast_loader=False, ssl_views=2, num_workers=0))
    # numpy arrays travel back by value (tensors would be shared through the exiting worker's file descriptors)
    return model.local_keys.numpy(), model.queue.numpy(), int(model.queue_pointer)


@pytest.mark.ddp
def test_queue_under_ddp_holds_every_ranks_keys_in_rank_order(tmp_path):
    (keys0, queue0, pointer0), (keys1, queue1, pointer1) = run_distributed(_queue_after_one_ddp_step, str(tmp_path))
    keys0, queue0, keys1, queue1 = (torch.from_numpy(a) for a in (keys0, queue0, keys1, queue1))
    assert keys0.shape == keys1.shape == (16, 8) and not torch.allclose(keys0, keys1)  # 2 views x 8 images a rank
    torch.testing.assert_close(queue0, queue1)  # every rank holds the same queue
    torch.testing.assert_close(queue0[:16], keys0)  # rank 0's keys, then rank 1's
    torch.testing.assert_close(queue0[16:32], keys1)
    torch.testing.assert_close(queue0[32:], _recording_moco().queue[32:])  # the older entries are untouched
    assert pointer0 == pointer1 == 32  # advanced by the global number of keys (2 views x 8 images x 2 ranks)


def _info_nce_by_hand(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float) -> float:
    """Mean over rows of ``-log(exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.queue_j / T)))``, one scalar at a time."""
    total = 0.0
    for q, k in zip(queries.tolist(), keys.tolist()):
        positive = math.exp(sum(a * b for a, b in zip(q, k)) / temperature)
        negatives = sum(math.exp(sum(a * b for a, b in zip(q, n)) / temperature) for n in queue.tolist())
        total -= math.log(positive / (positive + negatives))
    return total / len(queries)


@pytest.mark.parametrize("symmetric", [False, True])
def test_asymmetric_loss_is_one_direction_and_enqueues_only_its_keys(symmetric):
    """MoCo v2's original loss is ``l(q1, k2)`` alone with only ``k2`` enqueued; the symmetric "v2+" loss averages
    both directions and enqueues ``[k1; k2]``. Checked to fail when the option is ignored (the symmetric loss and
    queue under ``symmetric=False``) and when the directions are swapped (``l(q2, k1)``)."""
    model = _moco(symmetric=symmetric, temperature=0.2, queue_size=16)
    queue = model.queue.clone()
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)]
    features = [model(v) for v in views]
    loss = model.ssl_loss(views, features)

    with torch.no_grad():
        q1, q2 = (F.normalize(model.projector(f), dim=1) for f in features)
        k1, k2 = model.keys(views[0]), model.keys(views[1])
    forward = _info_nce_by_hand(q1, k2, queue, 0.2)
    if symmetric:
        expected, enqueued = (forward + _info_nce_by_hand(q2, k1, queue, 0.2)) / 2, torch.cat([k1, k2])
    else:
        expected, enqueued = forward, k2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(model.queue[: len(enqueued)], enqueued)
    torch.testing.assert_close(model.queue[len(enqueued) :], queue[len(enqueued) :])
    assert int(model.queue_pointer) == len(enqueued)
