"""The synthetic-set platform: DSA, ZCA, the evaluation protocol, files, pictures, exports and DDP."""

from __future__ import annotations

import math

import pytest
import torch

from lit_methods.distillation import (
    DSA,
    DataDAM,
    EvaluationSettings,
    SyntheticSetEvaluator,
    ZCAWhitening,
    evaluate_synset,
    load_synset,
    save_synset,
)
from lit_methods.distillation import base as distillation_base
from lit_methods.distillation.evaluate import main as evaluate_main
from tests.ddp_helpers import init_gloo, run_distributed
from tests.distillation.helpers import TINY_NET, attached, digits
from tests.helpers import cpu_trainer


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_is_siamese_and_differentiable(op):
    """Generators seeded alike give a real and a synthetic batch the same op with the same parameters: augmenting
    two batches separately equals augmenting their concatenation; the gradient reaches the images."""
    dsa = DSA(op)
    real, syn = torch.randn(5, 3, 8, 8), torch.randn(2, 3, 8, 8, requires_grad=True)
    together = dsa(torch.cat([real, syn]), torch.Generator().manual_seed(3))
    apart = torch.cat([dsa(real, torch.Generator().manual_seed(3)), dsa(syn, torch.Generator().manual_seed(3))])
    torch.testing.assert_close(together, apart)
    (grad,) = torch.autograd.grad(dsa(syn, torch.Generator().manual_seed(3)).sum(), syn)
    assert grad.abs().sum() > 0


def test_dsa_changes_images_and_always_flip_draws_no_flip_op():
    x = torch.randn(64, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    outputs = [DSA()(x, g, siamese=False) for _ in range(10)]
    assert sum(not torch.equal(o, x) for o in outputs) >= 8  # a flip of a random image always changes it too
    assert "flip" not in DSA(always_flip=True).choices
    with pytest.raises(ValueError, match="blur"):
        DSA("color_blur")


def test_zca_whitens_to_identity_covariance():
    """With a tiny eps the whitened training data has identity covariance, and the matrix is symmetric (ZCA, not
    PCA whitening: the whitened data stays closest to the original)."""
    torch.manual_seed(0)
    data = torch.randn(500, 12) @ torch.randn(12, 12) + 3.0
    zca = ZCAWhitening(12, eps=1e-8).fit(data.view(500, 3, 2, 2))
    white = zca(data.view(500, 3, 2, 2)).reshape(500, 12).double()
    covariance = torch.cov(white.T)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(zca.matrix, zca.matrix.T)


def test_evaluation_is_deterministic_and_checks_shapes():
    datamodule = digits()
    test = datamodule.to_inputs(datamodule.test_images), datamodule.test_labels
    images = datamodule.to_inputs(datamodule.train_images[:20])
    labels = datamodule.train_labels[:20]
    settings = EvaluationSettings(num_nets=2, epochs=3, depth=2, width=8, seed=1)
    first = evaluate_synset(images, labels, *test, settings)
    assert first == evaluate_synset(images, labels, *test, settings)
    assert first[0] == pytest.approx(sum(first[2]) / 2) and len(first[2]) == 2
    with pytest.raises(ValueError, match="do not match"):
        evaluate_synset(images[:, :, :4], labels, *test, settings)


def test_bad_input_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="ipc"):
        DataDAM(ipc=0, **TINY_NET)
    with pytest.raises(ValueError, match="fewer real images than ipc=200"):
        attached(DataDAM, ipc=200, batch_real=8)
    with pytest.raises(ValueError, match="normalize=false"):
        DataDAM(zca=True, **TINY_NET)
    module = attached(DataDAM, ipc=2)
    path = save_synset(tmp_path / "set.pt", module.synthetic_set())
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the data's images are \(3, 32, 32\)"):
        load_synset(path, num_classes=10, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="holds 10 classes but the data has 100"):
        load_synset(path, num_classes=100)


def test_a_run_holds_only_the_synthetic_set_and_exports_it(in_tmp_dir):
    """Two steps with the evaluator: the optimizer and checkpoint hold the synthetic set alone, the checkpoint writes
    a synthetic-set file, the evaluator logs accuracies and saves the picture; the evaluate command reads the file."""
    module = DataDAM(ipc=2, batch_real=16, **TINY_NET)
    evaluator = SyntheticSetEvaluator(num_nets=1, epochs=2, depth=2, width=8)
    trainer = cpu_trainer(max_steps=2, max_epochs=-1, callbacks=[evaluator], default_root_dir=str(in_tmp_dir))
    trainer.fit(module, datamodule=digits())
    (optimizer,) = trainer.optimizers
    assert [p for group in optimizer.param_groups for p in group["params"]] == [module.image_syn]
    assert [name for name, _ in module.named_parameters()] == ["image_syn"]
    trainer.save_checkpoint(in_tmp_dir / "last.ckpt")
    checkpoint = torch.load(in_tmp_dir / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"image_syn", "label_syn", "initialized"}
    exported = load_synset(in_tmp_dir / "synsets" / "synset_step=2.pt", num_classes=10, image_shape=(1, 8, 8))
    assert torch.equal(exported["images"], module.image_syn.detach())
    assert (in_tmp_dir / "synset_step=2.png").is_file()
    assert len(evaluator.results) == 1 and 0.0 <= evaluator.results[0][1] <= 1.0
    accuracy = evaluate_main(
        [str(in_tmp_dir / "synsets" / "synset_step=2.pt"), "--data", "lit_methods.datamodules.DigitsDataModule",
         "--num-nets", "1", "--epochs", "2", "--depth", "2", "--width", "8"]
    )
    assert 0.0 <= accuracy[0] <= 1.0 and not math.isnan(accuracy[0])


def _rank_gradient() -> torch.Tensor:
    torch.set_num_threads(1)
    init_gloo()
    module = attached(DataDAM, ipc=2, batch_real=16)
    return module.image_gradients()[1][0]


@pytest.mark.ddp
def test_two_ranks_equal_one_process_doing_both_ranks_work(monkeypatch):
    """Each rank draws its own net, real batches and DSA (rank-dependent seeds); the averaged image gradient of two
    gloo ranks equals the mean of the two gradients computed in one process, and both ranks hold the same result."""
    rank0, rank1 = run_distributed(_rank_gradient)
    torch.testing.assert_close(rank0, rank1)
    single = []
    for rank in (0, 1):
        monkeypatch.setattr(distillation_base, "process_rank", lambda rank=rank: rank)
        single.append(attached(DataDAM, ipc=2, batch_real=16).image_gradients()[1][0])
    assert not torch.allclose(single[0], single[1])  # the ranks really did different work
    torch.testing.assert_close(rank0, (single[0] + single[1]) / 2, atol=1e-6, rtol=1e-5)


DDP_STEPS = 3


class BothRanksDataDAM(DataDAM):
    """The one-process reference of a 2-rank run: each step computes rank 0's and rank 1's image gradient (their own
    nets, real batches and DSA, as the ranks draw them) and steps with their mean."""

    def image_gradients(self):
        losses, grads = [], []
        original = distillation_base.process_rank
        try:
            for rank in (0, 1):
                distillation_base.process_rank = lambda rank=rank: rank
                loss, rank_grads = super().image_gradients()
                losses.append(loss)
                grads.append(rank_grads)
        finally:
            distillation_base.process_rank = original
        return (losses[0] + losses[1]) / 2, [(a + b) / 2 for a, b in zip(*grads)]


def _fit_synthetic_set(cls: type, devices: int, strategy: str) -> torch.Tensor:
    torch.set_num_threads(1)
    module = cls(ipc=2, batch_real=16, **TINY_NET)
    cpu_trainer(devices=devices, strategy=strategy, max_steps=DDP_STEPS, max_epochs=-1).fit(module, datamodule=digits())
    return module.image_syn.detach().clone()


@pytest.mark.ddp
def test_lightning_ddp_trainer_equals_one_process_averaging_both_ranks():
    """``Trainer(strategy="ddp", accelerator="cpu", devices=2)``, 3 DataDAM steps: both ranks end with the same
    synthetic set, bitwise equal to one process that, at every step, averages the gradients of the work of rank 0 and
    rank 1 (two all-reduced float values are summed the same way in both runs, so equality is exact). Checked to
    fail for a no-op: without the all-reduce each rank steps with its own gradient and the ranks differ."""
    rank0, rank1 = run_distributed(_fit_synthetic_set, DataDAM, 2, "ddp")
    reference = _fit_synthetic_set(BothRanksDataDAM, 1, "auto")
    alone = _fit_synthetic_set(DataDAM, 1, "auto")
    assert torch.equal(rank0, rank1)
    assert torch.equal(rank0, reference)
    assert not torch.allclose(alone, reference)  # rank 1's work really changed the result
