"""NMC baseline (arXiv:2210.04428): the card's checks on digits with a frozen random ConvNet as the feature extractor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning.pytorch.loggers import CSVLogger

from lit_methods.continual import NCMHead, NMCBaseline
from lit_methods.datamodules import ClassIncrementalDataModule, DigitsDataModule
from lit_methods.nets import ConvNet
from tests.ddp_helpers import init_gloo, run_distributed
from tests.helpers import cpu_trainer


def make_backbone() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=16, image_size=8)


def run_stream(log_dir=None, **stream_kwargs) -> tuple[NMCBaseline, ClassIncrementalDataModule, dict]:
    """NMC over a digits stream (no augmentation) through Lightning (a CSV logger in ``log_dir`` if given); returns
    the model, the stream and the backbone weights it started from."""
    torch.set_num_threads(1)  # tiny net on a shared CPU (the conftest restores the count)
    digits = DigitsDataModule(batch_size=64, crop_padding=0, num_workers=0)
    stream = ClassIncrementalDataModule(digits, epochs_per_task=1, **stream_kwargs)
    model = NMCBaseline(make_backbone(), num_classes=10, mean=digits.mean, std=digits.std)
    before = copy.deepcopy(model.backbone.state_dict())
    logger = CSVLogger(log_dir, name="nmc") if log_dir is not None else False
    trainer = cpu_trainer(
        max_epochs=stream.num_tasks, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, logger=logger
    )
    trainer.fit(model, datamodule=stream)
    return model, stream, before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_stream(tmp_path_factory.mktemp("logs"), classes_per_task=2)


def normalized_features(model: NMCBaseline, stream: ClassIncrementalDataModule, train: bool):
    images, labels = stream._split(train)
    with torch.no_grad():
        features = F.normalize(model.backbone.forward_features(stream.to_inputs(images)), dim=1)
    return features.double(), stream.relabelled(labels)


def test_predictions_equal_sklearn_nearest_centroid(trained):
    """(a) sklearn's NearestCentroid fitted on all training features (normalised the same way) predicts every test
    image as NMC does after the last task; the stream reaches a usable accuracy (random conv features on digits)."""
    from sklearn.neighbors import NearestCentroid

    model, stream, _ = trained
    train_features, train_targets = normalized_features(model, stream, train=True)
    test_features, test_targets = normalized_features(model, stream, train=False)
    reference = NearestCentroid().fit(train_features.numpy(), train_targets.numpy()).predict(test_features.numpy())
    predicted = model.head.predict(test_features)
    assert torch.equal(predicted, torch.from_numpy(reference))
    assert (predicted == test_targets).double().mean() > 0.7
    metrics = model.stream_metrics()
    assert metrics["avg_incremental_acc"] > metrics["final_acc"] > 0.7


def test_the_accuracy_matrix_is_logged_as_a_table_and_a_heatmap(trained):
    """The driver fills one row per task (the lower triangle), logs the stream metrics every task and writes the
    matrix next to the logs; the last row's seen-class accuracy is the final accuracy."""
    import csv

    model, stream, _ = trained
    matrix = model.measured_matrix()
    above = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert matrix.shape == (5, 5) and not matrix[~above].isnan().any() and matrix[above].isnan().all()
    folder = Path(model.trainer.log_dir)
    table = (folder / "accuracy_matrix.md").read_text()
    assert f"{100 * matrix[4, 3].item():.2f}" in table and "avg_incremental_acc" in table
    assert (folder / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    rows = [r for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("val/avg_incremental_acc")]
    assert len(rows) == 5
    assert float(rows[-1]["val/avg_incremental_acc"]) == pytest.approx(model.stream_metrics()["avg_incremental_acc"])
    assert float(rows[-1]["val/acc"]) == pytest.approx(model.stream_metrics()["final_acc"], abs=1e-6)


def test_streaming_means_equal_batch_means_and_backbone_is_untouched(trained):
    """(c) the means accumulated batch by batch over five tasks equal the per-class means of all features at once;
    (d) the backbone's weights and buffers (batch-norm statistics too) are bit-identical after the stream."""
    model, stream, before = trained
    features, targets = normalized_features(model, stream, train=True)
    batch_means = torch.stack([features[targets == c].mean(0) for c in range(10)])
    torch.testing.assert_close(model.head.means(), batch_means, atol=1e-6, rtol=0)
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_class_order_and_task_split_do_not_change_the_result(trained):
    """(b) another class order cut into 4 + 2 + 2 + 2 classes gives the same means (mapped back to the digits) and
    hence the same final predictions."""
    model, stream, _ = trained
    other_model, other_stream, _ = run_stream(classes_per_task=2, first_task_classes=4, class_order_seed=7)
    assert other_stream.class_order != stream.class_order
    means = model.head.means()[stream.relabel]  # rows in digit order
    other_means = other_model.head.means()[other_stream.relabel]
    torch.testing.assert_close(means, other_means, atol=1e-12, rtol=0)
    features, _ = normalized_features(model, stream, train=False)
    digits = torch.tensor(stream.class_order)[model.head.predict(features)]
    other_digits = torch.tensor(other_stream.class_order)[other_model.head.predict(features)]
    assert torch.equal(digits, other_digits)


def _shard_sums(features: torch.Tensor, targets: torch.Tensor) -> tuple[list, list]:
    import os

    init_gloo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    head = NCMHead(10, features.shape[1])
    for chunk in range(0, len(targets), 50):  # each rank streams its own interleaved shard in batches
        idx = torch.arange(chunk, min(chunk + 50, len(targets)))
        idx = idx[idx % world == rank]
        head.update(features[idx], targets[idx])
    return head.sums.tolist(), head.counts.tolist()  # plain lists: tensors shared by a finished process do not arrive


@pytest.mark.ddp
def test_two_process_sums_equal_one_process(trained):
    """(e) two processes, each streaming half of the samples, end with the sums and counts of one process that saw
    all of them (all-reduced at every update)."""
    model, stream, _ = trained
    features, targets = normalized_features(model, stream, train=True)
    single = NCMHead(10, features.shape[1])
    single.update(features, targets)
    results = run_distributed(_shard_sums, features, targets)
    (sums0, counts0), (sums1, counts1) = [tuple(torch.tensor(v, dtype=torch.float64) for v in r) for r in results]
    assert torch.equal(sums0, sums1) and torch.equal(counts0, counts1)
    torch.testing.assert_close(sums0, single.sums, atol=1e-9, rtol=0)
    assert torch.equal(counts0, single.counts)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="num_classes is required"):
        NMCBaseline(make_backbone())
    with pytest.raises(ValueError, match="resize_to must be >= 1"):
        NMCBaseline(make_backbone(), num_classes=10, resize_to=0)
    head = NCMHead(3, 4)
    with pytest.raises(ValueError, match="no class mean yet"):
        head.predict(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        head.update(torch.zeros(2, 4), torch.tensor([0, 3]))


def _digits_loader(count: int):
    """The first ``count`` digits training images as normalised inputs with their labels, batches of 64."""
    digits = DigitsDataModule(batch_size=64, crop_padding=0, num_workers=0)
    digits.setup("fit")
    inputs = digits.to_inputs(digits.train_images[:count])
    dataset = torch.utils.data.TensorDataset(inputs, digits.train_labels[:count])
    return torch.utils.data.DataLoader(dataset, batch_size=64), digits


def _learn_means(devices: int, strategy: str, count: int) -> tuple[list, list, int]:
    torch.set_num_threads(1)
    loader, digits = _digits_loader(count)
    model = NMCBaseline(make_backbone(), num_classes=10, mean=digits.mean, std=digits.std)
    trainer = cpu_trainer(devices=devices, strategy=strategy, logger=False)
    model.learn_class_means(trainer, loader)
    return model.head.sums.tolist(), model.head.counts.tolist(), int(model.seen_classes)


@pytest.mark.ddp
def test_class_means_under_lightning_ddp_equal_one_process():
    """Item (e) through a Lightning Trainer: ``learn_class_means`` under ``Trainer(strategy="ddp", devices=2)``
    (two gloo processes; a ``trainer.fit`` would stop at DistributedDataParallel's refusal of a module with nothing
    to train) ends with the sums and counts of one process over all the data, on both ranks. 129 samples in batches
    of 64 give the ranks 65 and 64 samples (2 batches and 1), so a per-batch collective would hang and a padding
    sampler would count a sample twice (130); without the final all-reduce each rank would hold only its share
    (checked by hand by dropping the reduce: the sums differ)."""
    single_sums, single_counts, single_seen = _learn_means(1, "auto", 129)
    assert sum(single_counts) == 129 and single_seen == 10
    results = run_distributed(_learn_means, 2, "ddp", 129)
    for sums, counts, seen in results:
        assert counts == single_counts and seen == single_seen
        torch.testing.assert_close(torch.tensor(sums), torch.tensor(single_sums), atol=1e-9, rtol=0)
