"""CUDA unlearnable data (arXiv:2303.04278): the poisoning's invariants against a naive per-image loop, the card's
check on digits (poisoned model fits the poisoned set but fails on clean test data; a random-filter control does
not; filtering the test set with the class filters restores it) and the DAT defence's invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_methods.datamodules import DigitsDataModule
from lit_methods.datamodules.unlearnable import (
    CUDATransform,
    CUDAUnlearnableDataModule,
    DeconvolutionAdversarialTraining,
    deconvolution_attack,
)
from lit_methods.nets import ConvNet
from tests.helpers import cpu_trainer


def random_images(n: int = 12, c: int = 3, size: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 4


def naive_poison(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """One image, channel by channel, with an explicit loop over the kernel's taps (zero padding)."""
    x = image.double() / 255.0
    k = kernel.shape[-1]
    padded = F.pad(x, (k // 2,) * 4)
    out = torch.zeros_like(x)
    for dy in range(k):
        for dx in range(k):
            out += kernel[dy, dx].double() * padded[:, dy : dy + x.shape[1], dx : dx + x.shape[2]]
    return (out / out.max() * 255.0).clamp(0, 255).floor().to(torch.uint8)


def test_poisoning_matches_a_naive_loop_and_keeps_the_invariants():
    images, labels = random_images()
    transform = CUDATransform(num_classes=4, key=7)
    poisoned = transform(images, labels)
    filters = transform.filters
    assert filters.shape == (4, 3, 3)
    for kernel in filters:  # one entry equal to `center`, the rest in [0, blur]
        assert int((kernel == 1.0).sum()) == 1
        assert bool(((kernel == 1.0) | ((kernel >= 0) & (kernel <= 0.3))).all())
    for image, label, out in zip(images, labels, poisoned):
        expected = naive_poison(image, filters[label])
        # float32 against float64: a value on a quantisation edge may floor to the neighbour
        assert (out.int() - expected.int()).abs().max() <= 1
        assert out.max() >= 254  # divided by the global max over all channels, not per channel
    assert torch.equal(poisoned, CUDATransform(num_classes=4, key=7)(images, labels))  # byte-identical from the key
    assert not torch.equal(poisoned, CUDATransform(num_classes=4, key=8)(images, labels))
    assert torch.equal(CUDATransform(num_classes=4, key=7, mix=0.0)(images, labels), images)
    filtered = transform.class_filtered(images, labels)
    assert filtered.min() >= 0 and filtered.max() <= 1


def test_mix_poisons_a_keyed_fraction_and_leaves_the_rest():
    images, labels = random_images(n=400, size=5)
    full = CUDATransform(num_classes=4, key=3)(images, labels)
    half = CUDATransform(num_classes=4, key=3, mix=0.5)(images, labels)
    untouched = (half == images).flatten(1).all(dim=1)
    assert 0.4 < untouched.float().mean() < 0.6
    assert torch.equal(half[~untouched], full[~untouched])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mix": 1.5}, "mix"), ({"kernel_size": 4}, "kernel_size"), ({"key": -1}, "key"), ({"blur": -0.1}, "blur")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CUDATransform(num_classes=10, **kwargs)


def train_convnet(images: torch.Tensor, labels: torch.Tensor, epochs: int = 15) -> torch.nn.Module:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=32, norm="batchnorm", image_size=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    x = images.float() / 255.0
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=order).split(64):
            loss = F.cross_entropy(net(x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return 100.0 * float((net(x).argmax(dim=1) == labels).float().mean())


@pytest.fixture(scope="module")
def digits_runs() -> dict[str, dict[str, float]]:
    """Clean, CUDA (key 0) and random-filter control models on digits (ConvNet-2 of width 32, Adam, 15 epochs)."""
    torch.set_num_threads(1)
    runs: dict[str, dict[str, float]] = {}
    for name, options in (("clean", None), ("cuda", True), ("control", False)):
        data = DigitsDataModule(normalize=False)
        datamodule = data if options is None else CUDAUnlearnableDataModule(data, key=0, class_wise=options)
        datamodule.setup("fit")
        data.setup("test")
        net = train_convnet(data.train_images, data.train_labels)
        runs[name] = {
            "train": accuracy(net, data.train_images, data.train_labels),
            "test": accuracy(net, data.test_images, data.test_labels),
        }
        if options:
            filtered = datamodule.transform.class_filtered(data.test_images, data.test_labels)
            runs[name]["filtered_test"] = accuracy(net, filtered, data.test_labels)
            assert torch.equal(datamodule.clean_train_images, DigitsDataModule().load_split(train=True)[0])
            assert torch.equal(data.test_images, DigitsDataModule().load_split(train=False)[0])  # test stays clean
    return runs


def test_cuda_makes_digits_unlearnable_through_the_class_wise_shortcut(digits_runs):
    """The card's check. Fails for a no-op transform (mix=0: the "cuda" model scores as the clean one, checked by
    hand) and for per-image filters (the control's row: the harm needs the class-wise tie)."""
    clean, cuda, control = digits_runs["clean"], digits_runs["cuda"], digits_runs["control"]
    assert cuda["train"] > 90.0
    assert cuda["test"] <= clean["test"] - 30.0, digits_runs
    assert control["test"] >= clean["test"] - 10.0, digits_runs
    assert cuda["filtered_test"] > 95.0, digits_runs  # the filters were learnt in place of the digits


def test_the_datamodule_trains_from_the_cli_shape_with_the_report(tmp_path):
    datamodule = CUDAUnlearnableDataModule(DigitsDataModule(batch_size=64, num_workers=0), key=1)
    from lit_methods import ImageClassifier
    from lit_methods.datamodules.unlearnable import UnlearnabilityReport

    model = ImageClassifier(ConvNet(num_classes=10, in_channels=1, depth=1, width=8, image_size=8), lr=0.05)
    report = UnlearnabilityReport()
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0, callbacks=[report], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    assert set(report.figures) == {"poisoned_train_acc", "clean_train_acc", "clean_test_acc", "class_filtered_test_acc"}
    assert (tmp_path / "unlearnability_report.csv").read_text().startswith("metric,accuracy_percent\n")


def test_deconvolution_attack_raises_the_loss_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = ConvNet(num_classes=4, in_channels=3, depth=1, width=8, norm="none", image_size=9).eval()
    images, labels = random_images()
    x = images.float() / 255.0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    start = deconvolution_attack(net, x, labels, num_classes=4, steps=1, step_size=1e-12)
    torch.manual_seed(1)
    attacked = deconvolution_attack(net, x, labels, num_classes=4, steps=10, step_size=0.1)
    assert attacked.min() >= 0 and attacked.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(net(attacked), labels) > F.cross_entropy(net(start), labels)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_deconvolution_adversarial_training_needs_pixel_inputs():
    from lit_methods import ImageClassifier

    model = ImageClassifier(ConvNet(num_classes=10, in_channels=1, depth=1, width=8, image_size=8), lr=0.05)
    trainer = cpu_trainer(max_steps=1, callbacks=[DeconvolutionAdversarialTraining(steps=1)])
    with pytest.raises(ValueError, match="normalize=False"):
        trainer.fit(model, datamodule=CUDAUnlearnableDataModule(DigitsDataModule(num_workers=0)))
