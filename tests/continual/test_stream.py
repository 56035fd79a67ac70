"""The class-incremental datamodule and the accuracy-matrix metrics (against a hand loop and against Avalanche)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_methods.continual.metrics import (
    accuracy_matrix_table,
    average_forgetting,
    average_incremental_accuracy,
    save_accuracy_matrix_heatmap,
    seen_class_accuracy,
)
from lit_methods.datamodules import ClassIncrementalDataModule, DigitsDataModule
from lit_methods.datamodules.continual import class_incremental_tasks, seeded_class_order


def digits_stream(**kwargs) -> ClassIncrementalDataModule:
    stream = ClassIncrementalDataModule(DigitsDataModule(batch_size=64, num_workers=0), **kwargs)
    stream.setup("fit")
    return stream


def test_tasks_relabel_the_classes_in_their_order_and_cover_the_split():
    order = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    stream = digits_stream(classes_per_task=2, first_task_classes=4, class_order=order)
    assert [list(r) for r in stream.tasks] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    labels = stream.datamodule.train_labels
    sizes = 0
    for task, classes in enumerate(stream.tasks):
        images, targets = stream.task_split(task)
        assert set(targets.tolist()) == set(classes)
        originals = torch.tensor(order)[targets]  # relabelled class -> original digit
        assert all(int((labels == c).sum()) == int((originals == c).sum()) for c in originals.unique())
        sizes += len(targets)
    assert sizes == len(labels)
    batch = next(iter(stream.task_loader(1, train=False)))
    assert torch.equal(batch["task"], torch.ones_like(batch["targets"]))


def test_seeded_order_is_numpy_permutation_and_first_task_can_hold_half_the_classes():
    assert seeded_class_order(10, 1993) == seeded_class_order(10, 1993) != seeded_class_order(10, 1)
    assert sorted(seeded_class_order(100, 1993)) == list(range(100))
    assert [len(r) for r in class_incremental_tasks(100, 50, 10)] == [50] + [10] * 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_task": 3}, "do not cover the 10 classes"),
        ({"classes_per_task": 2, "first_task_classes": 11}, "first_task_classes must lie in"),
        ({"classes_per_task": 0}, "classes_per_task must be >= 1"),
        ({"classes_per_task": 2, "class_order": [0, 1, 2]}, "permutation of the 10 classes"),
        ({"classes_per_task": 2, "epochs_per_task": 0}, "epochs_per_task must be >= 1"),
    ],
)
def test_bad_task_splits_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassIncrementalDataModule(DigitsDataModule(num_workers=0), **kwargs)


def test_epochs_past_the_stream_are_refused():
    stream = ClassIncrementalDataModule(DigitsDataModule(num_workers=0), classes_per_task=5, epochs_per_task=3)
    assert [stream.task_of_epoch(e) for e in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="set trainer.max_epochs=6"):
        stream.task_of_epoch(6)


def naive_metrics(matrix: torch.Tensor, sizes: list[int]) -> tuple[float, float, float]:
    """Average incremental accuracy and forgetting (max and first reference) by plain Python loops."""
    n = len(sizes)
    seen = [sum(matrix[t][j] * sizes[j] for j in range(t + 1)) / sum(sizes[: t + 1]) for t in range(n)]
    drops_max = [max(matrix[t][j] for t in range(j, n - 1)) - matrix[n - 1][j] for j in range(n - 1)]
    drops_first = [matrix[j][j] - matrix[n - 1][j] for j in range(n - 1)]
    return sum(seen) / n, sum(drops_max) / (n - 1), sum(drops_first) / (n - 1)


def test_metrics_match_a_plain_loop_on_a_matrix_where_max_and_first_differ(tmp_path):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.rand(4, 4, generator=generator, dtype=torch.float64).tril()
    matrix[1, 0] = matrix[0, 0] + 0.1  # task 0 improves after task 1: the "max" reference differs from "first"
    matrix = matrix.clamp(max=1.0)
    sizes = [30, 10, 20, 40]
    aia, forget_max, forget_first = naive_metrics(matrix.tolist(), sizes)
    assert average_incremental_accuracy(matrix, sizes) == pytest.approx(aia)
    assert average_forgetting(matrix, "max") == pytest.approx(forget_max)
    assert average_forgetting(matrix, "first") == pytest.approx(forget_first)
    assert forget_max != pytest.approx(forget_first)
    assert seen_class_accuracy(matrix, sizes)[0] == matrix[0, 0]
    table = accuracy_matrix_table(matrix)
    assert table.count("\n") == 5 and f"{100 * matrix[3, 2]:.2f}" in table
    png = save_accuracy_matrix_heatmap(matrix, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nan_row = matrix.clone()
    nan_row[2, 1] = math.nan
    with pytest.raises(ValueError, match="row 2"):
        seen_class_accuracy(nan_row, sizes)


def test_stream_and_metrics_agree_with_avalanche():
    """On a small stream (16-d Gaussian blobs, 6 classes: 2 + 2 + 2), Avalanche's nc_benchmark with our class order
    and first-task size puts the same classes in each experience, and its StreamForgetting and per-step stream
    accuracy equal ours computed from the accuracy matrix of its own Top1_Acc_Exp values."""
    pytest.importorskip("avalanche")
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(6, 16, generator=generator)

    def blobs(per_class: int) -> TensorDataset:
        y = torch.arange(6).repeat_interleave(per_class)
        x = centres[y] + 2.0 * torch.randn(len(y), 16, generator=generator)
        dataset = TensorDataset(x, y)
        dataset.targets = y.tolist()
        return as_classification_dataset(dataset)

    order = seeded_class_order(6, 1993)
    tasks = class_incremental_tasks(6, 2, 2)
    benchmark = nc_benchmark(
        blobs(40), blobs(25), n_experiences=3, task_labels=False, fixed_class_order=order, per_exp_classes={0: 2}
    )
    for experience, classes in zip(benchmark.train_stream, tasks):
        assert sorted(experience.classes_in_this_experience) == sorted(order[c] for c in classes)

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 6)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True), loggers=[]
    )
    strategy = Naive(
        model, torch.optim.SGD(model.parameters(), lr=0.5), train_mb_size=16, train_epochs=5, evaluator=evaluator
    )
    matrix = torch.full((3, 3), math.nan, dtype=torch.float64)
    stream_accuracy, sizes = [], [len(e.dataset) for e in benchmark.test_stream]
    for t, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream[: t + 1])
        for j in range(t + 1):
            matrix[t, j] = results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
        stream_accuracy.append(results["Top1_Acc_Stream/eval_phase/test_stream/Task000"])
    assert seen_class_accuracy(matrix, sizes).tolist() == pytest.approx(stream_accuracy)
    assert average_forgetting(matrix, "first") == pytest.approx(results["StreamForgetting/eval_phase/test_stream"])
    assert average_forgetting(matrix, "first") > 0.1  # a stream that forgets: the comparison is not of zeros


def test_a_trainer_that_keeps_its_loaders_is_refused():
    """The loader of the current task is rebuilt every epoch; a trainer that would keep task 0's loader is an error."""
    from tests.helpers import cpu_trainer

    stream = ClassIncrementalDataModule(DigitsDataModule(num_workers=0), classes_per_task=5)
    stream.trainer = cpu_trainer()
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        stream.setup("fit")


def test_class_incremental_stream_over_an_imagenet_folder(tmp_path):
    """A stream over the folder-read ImageNetDataModule (a class-list subset of a tiny ImageFolder written in the
    real ILSVRC layout, every image one colour that names it): each task's training loader yields exactly the
    training files of its classes, once each, with targets relabelled by the class order and their task; evaluation
    loaders hold every class; one Lightning fit of NMC over the stream counts each class's 3 training images once
    and fills the accuracy matrix's lower triangle. A stream that ignored the task (or the class order) would fail
    the file-set assertions."""
    import numpy as np

    from lit_methods.continual import NMCBaseline
    from lit_methods.datamodules import ImageNetDataModule
    from lit_methods.nets import ConvNet
    from tests.datamodules.imagenet_formats import colour_code, synthetic_wnids, write_class_list, write_imagenet
    from tests.helpers import cpu_trainer

    wnids = synthetic_wnids(5)
    written = write_imagenet(tmp_path, wnids, train_per_class=3, val_per_class=2, size=(12, 10))
    listed = wnids[:4]  # a class-list subset: the fifth class folder is not read
    class_list = write_class_list(tmp_path / "classes.txt", listed)
    order = [2, 0, 3, 1]
    folder = ImageNetDataModule(data_dir=tmp_path, class_list=class_list, image_size=8, normalize=False,
                                batch_size=4, num_workers=0)
    stream = ClassIncrementalDataModule(folder, classes_per_task=2, class_order=order)
    stream.setup("fit")

    def codes_and_targets(loader) -> list[tuple[int, int, int]]:
        rows = []
        for batch in loader:
            for image, target, task in zip(batch["inputs"], batch["targets"], batch["task"]):
                pixels = (image * 255).round().numpy().astype(np.uint8)
                rows.append((colour_code(pixels), int(target), int(task)))
        return rows

    def relabel(wnid: str) -> int:
        return order.index(listed.index(wnid))

    train_files = {p.parent.name: [] for p in written.files["train"]}
    for code, wnid in written.code_wnid.items():
        train_files[wnid].append(code)
    for task in (0, 1):
        rows = codes_and_targets(stream.task_loader(task, train=True))
        expected_classes = [listed[c] for c in order[2 * task: 2 * task + 2]]
        expected = sorted(code for w in expected_classes for code in train_files[w][:3])
        assert sorted(code for code, _, _ in rows) == expected
        for code, target, row_task in rows:
            assert target == relabel(written.code_wnid[code]) and row_task == task
    assert [c for _, c, _ in codes_and_targets(stream.train_dataloader())] != []  # task 0 without a trainer
    val_rows = codes_and_targets(stream.val_dataloader())
    assert sorted(t for _, t, _ in val_rows) == sorted(list(range(4)) * 2)
    assert all(task == target // 2 for _, target, task in val_rows)

    torch.manual_seed(0)
    backbone = ConvNet(num_classes=4, in_channels=3, depth=1, width=4, image_size=8)
    model = NMCBaseline(backbone, num_classes=4, mean=folder.mean, std=folder.std, inputs_normalized=False)
    trainer = cpu_trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, logger=False)
    trainer.fit(model, datamodule=stream)
    assert model.head.counts.tolist() == [3.0, 3.0, 3.0, 3.0]
    matrix = model.accuracy_matrix
    assert bool((matrix[0, 0] >= 0) & (matrix[1, :2] >= 0).all()) and float(matrix[0, 1]) == -1.0
