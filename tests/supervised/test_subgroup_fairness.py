"""Subgroup discrepancy: MacroStd against numpy (single process and 2-process DDP), CIFAR10-B labels and the
classifier's test report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_methods.datamodules import CIFAR10BDataModule
from lit_methods.nets import ConvNet
from lit_methods.supervised import MacroStd, SubgroupClassifier
from tests.datamodules.real_formats import write_cifar10
from tests.ddp_helpers import init_gloo, run_distributed
from tests.helpers import cpu_trainer

C, G = 4, 3


def numpy_macro_std(preds: np.ndarray, target: np.ndarray, subgroup: np.ndarray) -> float:
    stds = []
    for c in range(C):
        sizes, accs = [], []
        for g in range(G):
            cell = (target == c) & (subgroup == g)
            if cell.any():
                sizes.append(cell.sum())
                accs.append((preds[cell] == c).mean())
        if sizes:
            sizes, accs = np.array(sizes, float), np.array(accs)
            mean = (sizes * accs).sum() / sizes.sum()
            stds.append(np.sqrt((sizes * (accs - mean) ** 2).sum() / sizes.sum()))
    return float(np.mean(stds))


def _random_data(n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n,), generator=g)
    subgroup = torch.randint(0, G, (n,), generator=g)
    # accuracy depends on the subgroup, so the stds are far from 0
    correct = torch.rand(n, generator=g) < (0.3 + 0.3 * subgroup)
    preds = torch.where(correct, target, (target + 1) % C)
    return preds, target, subgroup


def test_macro_std_equals_a_direct_computation():
    preds, target, subgroup = _random_data()
    metric = MacroStd(C, G)
    metric.update(preds, target, subgroup)
    expected = numpy_macro_std(preds.numpy(), target.numpy(), subgroup.numpy())
    assert expected > 0.05
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_macro_std_is_invariant_to_batch_splitting_and_accepts_scores():
    preds, target, subgroup = _random_data()
    whole, chunks = MacroStd(C, G), MacroStd(C, G)
    whole.update(preds, target, subgroup)
    for part in torch.arange(len(preds)).chunk(3):
        chunks.update(torch.nn.functional.one_hot(preds[part], C).float(), target[part], subgroup[part])
    torch.testing.assert_close(whole.compute(), chunks.compute())


def test_equal_subgroup_accuracies_give_zero_and_empty_cells_are_skipped():
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    subgroup = torch.tensor([0, 0, 1, 1, 2, 2])  # class 0 in groups 0 and 1, class 1 only in group 2
    preds = torch.tensor([0, 1, 0, 1, 1, 0])  # 50% everywhere
    metric = MacroStd(C, G)
    metric.update(preds, target, subgroup)
    assert metric.compute().item() == 0.0
    assert metric.subgroup_accuracy()[0, 2].isnan()


def test_hand_computed_example():
    # class 0: group 0 has 3 images all right, group 1 has 1 image wrong -> mu = 0.75, std = sqrt(0.1875)
    metric = MacroStd(2, 2)
    metric.update(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 0, 0, 1, 0]))
    # class 1: one group only -> std 0; MacroStd = (sqrt(0.1875) + 0) / 2
    assert metric.compute().item() == pytest.approx(np.sqrt(0.1875) / 2, abs=1e-7)


def test_bad_subgroup_ids_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 5\]"):
        MacroStd(C, G).update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 5]))


def _macro_std_on_my_half() -> float:
    import os

    init_gloo()
    rank = int(os.environ["RANK"])
    preds, target, subgroup = _random_data()
    half = slice(rank * 200, (rank + 1) * 200)
    metric = MacroStd(C, G)
    metric.update(preds[half], target[half], subgroup[half])
    return metric.compute().item()


@pytest.mark.ddp
def test_ddp_sync_equals_the_single_process_value():
    preds, target, subgroup = _random_data()
    single = MacroStd(C, G)
    single.update(preds, target, subgroup)
    assert run_distributed(_macro_std_on_my_half) == pytest.approx([single.compute().item()] * 2, abs=1e-6)


def _write_subgroups(root, test_labels: np.ndarray, seed: int = 0) -> dict:
    """The published format: np.save of {class name: {"NNNN.png": id}}, NNNN counting each class's test images."""
    rng = np.random.default_rng(seed)
    table = {f"class_{c}": {} for c in range(10)}
    for c in range(10):
        for k in range(int((test_labels == c).sum())):
            table[f"class_{c}"][f"{k:04d}.png"] = int(rng.integers(0, 8))
    np.save(root / "cifar10_bgd_cl2img_gp_fine.npy", table, allow_pickle=True)
    return table


def test_cifar10b_test_batches_carry_the_subgroup_of_each_image(tmp_path):
    arrays = write_cifar10(tmp_path, n_train_per_batch=4, n_test=60)
    table = _write_subgroups(tmp_path, arrays.test_labels)
    dm = CIFAR10BDataModule(data_dir=tmp_path, batch_size=16)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert all(set(batch) == {"inputs", "targets", "subgroup"} for batch in batches)
    labels, subgroups = (torch.cat([batch[name] for batch in batches]) for name in ("targets", "subgroup"))
    seen = {c: 0 for c in range(10)}
    for label, subgroup in zip(labels.tolist(), subgroups.tolist()):
        assert subgroup == table[f"class_{label}"][f"{seen[label]:04d}.png"]
        seen[label] += 1
    assert dm.num_subgroups == 8 and len(labels) == 60


def test_cifar10b_reports_missing_and_bad_label_files(tmp_path):
    arrays = write_cifar10(tmp_path, n_train_per_batch=4, n_test=20)
    with pytest.raises(FileNotFoundError, match="cifar10_bgd_cl2img_gp_fine.npy"):
        CIFAR10BDataModule(data_dir=tmp_path).setup("test")
    table = _write_subgroups(tmp_path, arrays.test_labels)
    table["class_3"]["0000.png"] = 9
    np.save(tmp_path / "cifar10_bgd_cl2img_gp_fine.npy", table, allow_pickle=True)
    with pytest.raises(ValueError, match=r"\[0, 8\).*9"):
        CIFAR10BDataModule(data_dir=tmp_path).setup("test")


def test_classifier_reports_macro_std_of_its_test_predictions(tmp_path):
    arrays = write_cifar10(tmp_path, n_train_per_batch=4, n_test=80)
    _write_subgroups(tmp_path, arrays.test_labels)
    dm = CIFAR10BDataModule(data_dir=tmp_path, batch_size=32)
    torch.manual_seed(0)
    model = SubgroupClassifier(ConvNet(num_classes=10, in_channels=3, depth=2, width=4, image_size=32))
    trainer = cpu_trainer()
    (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(dm.on_after_batch_transfer(b, 0)["inputs"]).argmax(1) for b in dm.test_dataloader()])
    reference = MacroStd(10, 8)
    reference.update(preds, dm.test_labels, dm.test_subgroups)
    assert metrics["test/macro_std"] == pytest.approx(reference.compute().item(), abs=1e-6)
    accuracy = reference.subgroup_accuracy()
    assert metrics["test/worst_subgroup_acc"] == pytest.approx(accuracy[~accuracy.isnan()].min().item())
