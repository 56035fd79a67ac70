"""Hard-batch re-training (DyBAT): agreement with a plain re-implementation of the official training loop, top-k
selection, stale losses, the step budget, exact resume (from the last and from intermediate checkpoints, with and
without validation) and DDP sharding."""

from __future__ import annotations

import copy
import itertools

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_methods.datamodules.digits import DigitsDataModule
from lit_methods.datamodules.hard_batches import FixedBatches, HardBatchDataModule, HardBatchLoader, HardBatchSelector
from lit_methods.nets import ConvNet
from lit_methods.supervised.hard_batches import HardBatchClassifier
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer

BATCH_SIZE = 128  # 1,347 training digits -> b = 10 fixed batches
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: more threads only contend (the conftest restores the count)."""
    torch.set_num_threads(1)


def _datamodule(delta: float, **overrides) -> HardBatchDataModule:
    digits = DigitsDataModule(batch_size=BATCH_SIZE, crop_padding=0, horizontal_flip=False, num_workers=0, **overrides)
    return HardBatchDataModule(digits, delta=delta)


def _backbone(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(num_classes=10, in_channels=1, depth=1, width=8, norm="none", image_size=8)


def _model(backbone: torch.nn.Module) -> HardBatchClassifier:
    return HardBatchClassifier(
        backbone, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True, lr_schedule="constant"
    )


class Trajectory(Callback):
    """Parameters after every step, the batch id of every step and the selector's losses at each pass start."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.batch_ids: list[int] = []
        self.pass_ids: list[list[int]] = []
        self.pass_start_losses: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.pass_start_losses.append(trainer.datamodule.selector.losses.clone())
        self.pass_ids.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.pass_ids:  # a resumed run re-enters the saved epoch without on_train_epoch_start
            self.pass_ids.append([])
        self.params.append(torch.cat([p.detach().flatten().clone() for p in pl_module.backbone.parameters()]))
        self.batch_ids.append(int(batch["batch_id"]))
        self.pass_ids[-1].append(int(batch["batch_id"]))


def _reference_training(backbone, images, labels, batches, delta, epochs):
    """A plain re-implementation of the official loop (``run.py``: ``normal_train`` for delta = 1, else
    ``turbo_train``): returns the parameters after every step and the batch id of every step."""
    model = copy.deepcopy(backbone)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    params, trained = [], []

    def step(i):
        loss = F.cross_entropy(model(images[batches[i]]), labels[batches[i]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        params.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        trained.append(i)
        return loss.item()

    b = len(batches)
    if delta == 1.0:
        for _ in range(epochs):
            for i in range(b):
                step(i)
        return params, trained
    recorded = [(i, step(i)) for i in range(b)]
    while len(trained) < epochs * b:
        ranked = sorted(recorded, key=lambda pair: pair[1], reverse=True)
        for i in sorted(pair[0] for pair in ranked[: int(delta * b)]):
            if len(trained) == epochs * b:
                break
            recorded[i] = (i, step(i))
    return params, trained


@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_trajectory_equals_the_official_loop_and_meets_the_step_budget(delta):
    """delta = 1: step for step the trajectory of ordinary training on the same fixed batches; delta = 0.5: that of
    the official re-batching loop (top floor(delta * b) by stale losses, in id order, stopped at epochs * b)."""
    epochs = 3
    backbone = _backbone()
    datamodule = _datamodule(delta)
    datamodule.setup("fit")
    b = len(datamodule.fixed)
    assert b == 1347 // BATCH_SIZE
    trajectory = Trajectory()
    trainer = cpu_trainer(
        max_epochs=-1, max_steps=datamodule.budget_steps(epochs), callbacks=[trajectory], limit_val_batches=0
    )
    trainer.fit(_model(copy.deepcopy(backbone)), datamodule=datamodule)

    inner = datamodule.datamodule
    images = inner.to_inputs(inner.train_images)
    ref_params, ref_ids = _reference_training(
        backbone, images, inner.train_labels, datamodule.fixed.batches, delta, epochs
    )
    assert trainer.global_step == epochs * b == len(trajectory.params)
    assert trajectory.batch_ids == ref_ids
    for step, (ours, ref) in enumerate(zip(trajectory.params, ref_params)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=f"step {step}")
    if delta < 1.0:
        assert [len(p) for p in trajectory.pass_ids] == [b, b // 2, b // 2, b // 2, b // 2]


def test_selection_is_the_top_floor_delta_b_by_recorded_loss():
    generator = torch.Generator().manual_seed(0)
    for delta, b in [(0.5, 10), (0.3, 17), (0.8, 9), (1.0, 6)]:
        selector = HardBatchSelector(b, delta)
        losses = torch.rand(b, generator=generator)
        selector.record(torch.arange(b), losses)
        expected = sorted(np.argsort(-losses.numpy(), kind="stable")[: int(np.floor(delta * b))].tolist())
        assert selector.select(list(range(b))) == expected
        chosen = torch.tensor(expected)
        others = torch.tensor([i for i in range(b) if i not in expected], dtype=torch.long)
        if len(others):
            assert losses[chosen].min() >= losses[others].max()


def test_only_trained_batches_refresh_their_loss_and_stale_ones_re_enter():
    selector = HardBatchSelector(4, delta=0.5)
    selector.record(torch.arange(4), torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert selector.select([0, 1, 2, 3]) == [0, 1]
    selector.record(torch.tensor([0, 1]), torch.tensor([0.5, 2.5]))  # batch 0 got easy, batch 1 is still hard
    torch.testing.assert_close(selector.losses, torch.tensor([0.5, 2.5, 2.0, 1.0], dtype=torch.float64))
    assert selector.select([0, 1, 2, 3]) == [1, 2]  # stale batch 2 (loss 2.0) re-enters, batch 0 leaves


def test_fixed_batches_are_built_once_and_sharded_disjointly():
    fixed = FixedBatches(105, 10, shuffle=True, seed=3)
    again = FixedBatches(105, 10, shuffle=True, seed=3)
    assert len(fixed) == 10 and all(torch.equal(a, c) for a, c in zip(fixed.batches, again.batches))
    assert len(torch.cat(fixed.batches).unique()) == 100  # the last incomplete batch is dropped, no repeats
    shards = [FixedBatches(105, 10, shuffle=True, seed=3, rank=r, world_size=3).rank_batch_ids for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3] and len(set(itertools.chain(*shards))) == 9


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="delta must lie in \\(0, 1\\], got 1.5"):
        _datamodule(1.5)
    with pytest.raises(ValueError, match="got 0.0"):
        HardBatchSelector(10, 0.0)
    with pytest.raises(ValueError, match="delta=0.05 selects no batch out of 10"):
        HardBatchSelector(10, 0.05).num_selected(10)
    with pytest.raises(ValueError, match="fast_loader=True"):
        HardBatchDataModule(DigitsDataModule(fast_loader=False), delta=0.5)
    with pytest.raises(ValueError, match="batch ids \\[12\\] outside"):
        HardBatchSelector(10, 0.5).record(torch.tensor([12]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        cpu_trainer(max_epochs=1, limit_val_batches=0).fit(_model(_backbone()), datamodule=_datamodule(0.5))
    fixed = FixedBatches(100, 10, shuffle=False, seed=0, rank=0, world_size=2)
    loader = HardBatchLoader(torch.zeros(100, 1, 8, 8), torch.zeros(100), fixed, HardBatchSelector(10, 0.5), False)
    position = {"epoch": 1, "pass_ids": [1, 3], "yielded": 1, "counted_before": 0}  # rank 1's batches
    with pytest.raises(ValueError, match="batches \\[1, 3\\], which another rank trains"):
        loader.resume_after(position)
    datamodule = _datamodule(0.5)
    datamodule.setup("fit")
    datamodule.trainer = cpu_trainer(max_epochs=-1, max_steps=20, limit_train_batches=3)
    datamodule.load_state_dict({"loader": {"epoch": 0, "pass_ids": list(range(10)), "yielded": 3, "counted_before": 0}})
    with pytest.raises(ValueError, match="resuming with limit_train_batches=3 is not supported"):
        datamodule.train_dataloader()
    model = _model(_backbone())
    with pytest.raises(ValueError, match=r"batch_id field, got the fields \['inputs', 'targets'\]"):
        model.training_step((torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0)


def _fit(tmp_path, max_steps, ckpt_path=None, delta=0.5, validate=False, callbacks=(), every_n_train_steps=None):
    datamodule = _datamodule(delta)
    model = _model(_backbone())
    every = {"every_n_epochs": 1} if every_n_train_steps is None else {"every_n_train_steps": every_n_train_steps}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}-{step}", **every)
    validation = {
        "val_check_interval": 10,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
    }
    trainer = cpu_trainer(
        max_epochs=-1,
        max_steps=max_steps,
        deterministic=True,
        enable_checkpointing=True,
        callbacks=[checkpoint, *callbacks],
        **(validation if validate else {"limit_val_batches": 0}),
    )
    L.seed_everything(0)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, datamodule


def test_resume_from_a_pass_boundary_is_exact(tmp_path):
    """Three passes straight == two passes, then resume from the checkpoint for the third (the selector's losses
    travel in the checkpoint and decide the third pass)."""
    b, k = 10, 5
    straight, straight_dm = _fit(tmp_path / "straight", b + 2 * k)
    _fit(tmp_path / "first", b + k)
    resumed, resumed_dm = _fit(tmp_path / "second", b + 2 * k, ckpt_path=tmp_path / "first" / "epoch=1-step=15.ckpt")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(straight_dm.selector.losses, resumed_dm.selector.losses)


class StepLog(Callback):
    """The batch id of every training step, the global step of every validation, the final global step."""

    def __init__(self) -> None:
        self.batch_ids: list[int] = []
        self.validation_steps: list[int] = []
        self.global_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_ids.append(int(batch["batch_id"]))

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validation_steps.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.global_step = trainer.global_step


@pytest.mark.parametrize("validate", [False, True])
def test_resume_from_intermediate_checkpoints_of_a_longer_run_is_exact(tmp_path, validate):
    """Four passes with a checkpoint every epoch; resuming from the checkpoint after pass 1 and after pass 2 gives
    the straight run bit for bit: parameters, selector losses, global step, the batch ids trained after the
    checkpoint and the steps at which validation runs. delta = 0.8 (passes of b = 10 then 8 batches) so that a
    resumed epoch that counts pass 0's length, or the length of the pass before, trains the wrong number of batches.
    With validation every b steps, ModelCheckpoint saves on validation end instead, also in the middle of a pass
    (steps 10, 20, 30): those resume at the saved batch of the saved selection."""
    b, k = 10, 8
    max_steps = b + 3 * k
    straight_log = StepLog()
    straight, straight_dm = _fit(
        tmp_path / "straight", max_steps, delta=0.8, validate=validate, callbacks=[straight_log]
    )
    assert straight_log.global_step == max_steps == len(straight_log.batch_ids)
    saved_steps = [b, b + k] if not validate else [b, 2 * b]  # after pass 1, after pass 2 / mid-pass 3
    if validate:
        assert straight_log.validation_steps == [b, 2 * b, 3 * b]
    for step in saved_steps:
        (checkpoint,) = (tmp_path / "straight").glob(f"epoch=*-step={step}.ckpt")
        log = StepLog()
        resumed, resumed_dm = _fit(tmp_path / f"from{step}", max_steps, checkpoint, 0.8, validate, [log])
        for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(p, q), f"{name} after resuming from step {step}"
        assert torch.equal(straight_dm.selector.losses, resumed_dm.selector.losses)
        assert log.global_step == max_steps
        assert log.batch_ids == straight_log.batch_ids[step:]
        assert log.validation_steps == [s for s in straight_log.validation_steps if s > step]


def test_resume_from_step_checkpoints_inside_and_at_the_end_of_a_pass_is_exact(tmp_path):
    """Checkpoints every 3 steps (written on train batch end): step 15 lies inside pass 2 (steps 11-18, delta = 0.8),
    step 18 is its last batch; both resume at the saved batch of the saved selection, bit for bit."""
    max_steps = 10 + 3 * 8
    straight_log = StepLog()
    straight, straight_dm = _fit(tmp_path / "straight", max_steps, None, 0.8, False, [straight_log], 3)
    for step in (15, 18):
        (checkpoint,) = (tmp_path / "straight").glob(f"epoch=*-step={step}.ckpt")
        log = StepLog()
        resumed, resumed_dm = _fit(tmp_path / f"from{step}", max_steps, checkpoint, 0.8, False, [log], 3)
        for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(p, q), f"{name} after resuming from step {step}"
        assert torch.equal(straight_dm.selector.losses, resumed_dm.selector.losses)
        assert log.global_step == max_steps and log.batch_ids == straight_log.batch_ids[step:]


def _ddp_worker(num_passes: int, checkpoint_dir: str):
    torch.set_num_threads(1)
    b_rank, k = 5, 2  # b = 10 over 2 ranks; floor(0.5 * 5) = 2
    max_steps = b_rank + (num_passes - 1) * k

    def fit(callback, ckpt_path=None):
        datamodule = _datamodule(0.5)
        checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}-{step}")
        trainer = cpu_trainer(
            devices=2,
            strategy="ddp",
            max_epochs=-1,
            max_steps=max_steps,
            limit_val_batches=0,
            enable_checkpointing=ckpt_path is None,
            callbacks=[callback, checkpoint] if ckpt_path is None else [callback],
        )
        trainer.fit(_model(_backbone()), datamodule=datamodule, ckpt_path=ckpt_path)
        return datamodule

    trajectory = Trajectory()
    datamodule = fit(trajectory)
    resumed_log = StepLog()  # resumed from the checkpoint after pass 2 (rank 0 wrote it; both ranks load it)
    resumed_datamodule = fit(resumed_log, f"{checkpoint_dir}/epoch=1-step={b_rank + k}.ckpt")
    return {  # plain lists: tensors would travel back through shared memory of an exited process
        "rank_batch_ids": datamodule.fixed.rank_batch_ids,
        "pass_ids": trajectory.pass_ids,
        "pass_start_losses": [losses.tolist() for losses in trajectory.pass_start_losses],
        "final_losses": datamodule.selector.losses.tolist(),
        "batch_ids": trajectory.batch_ids,
        "resumed_batch_ids": resumed_log.batch_ids,
        "resumed_final_losses": resumed_datamodule.selector.losses.tolist(),
    }


@pytest.mark.ddp
def test_ddp_ranks_train_disjoint_shards_with_equal_steps_and_shared_losses(tmp_path):
    """Each rank trains its own shard's top floor(delta * b_rank) by the shared losses; resuming from the checkpoint
    after pass 2 continues every rank's batches and the shared losses exactly."""
    results = run_distributed(_ddp_worker, 4, str(tmp_path))
    shards = [r["rank_batch_ids"] for r in results]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(10))
    assert [len(p) for p in results[0]["pass_ids"]] == [len(p) for p in results[1]["pass_ids"]] == [5, 2, 2, 2]
    assert results[0]["final_losses"] == results[1]["final_losses"]
    assert np.isfinite(results[0]["final_losses"]).all()  # every rank's losses reached every rank
    for result in results:
        assert result["pass_ids"][0] == result["rank_batch_ids"]
        for ids, losses in zip(result["pass_ids"][1:], result["pass_start_losses"][1:]):
            shard = np.array(result["rank_batch_ids"])
            expected = sorted(shard[np.argsort(-np.array(losses)[shard], kind="stable")[:2]].tolist())
            assert ids == expected
    for p in range(4):
        assert results[0]["pass_start_losses"][p] == results[1]["pass_start_losses"][p]
    for result in results:
        assert result["resumed_batch_ids"] == result["batch_ids"][5 + 2 :]
        assert result["resumed_final_losses"] == result["final_losses"]
