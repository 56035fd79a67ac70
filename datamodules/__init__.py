"""LightningDataModules of lit-methods: CIFAR, ImageNet and their variants, Fashion-MNIST and digits."""

from lit_methods.datamodules.batch import Batch, as_batch
from lit_methods.datamodules.base import InMemoryVisionDataModule, VisionDataModule, WrappingDataModule
from lit_methods.datamodules.cifar import CIFAR10DataModule, CIFAR10LTDataModule, CIFAR100DataModule, CIFAR100LTDataModule
from lit_methods.datamodules.cifar_subgroups import CIFAR10BDataModule, CIFAR100BDataModule
from lit_methods.datamodules.digits import DigitsDataModule
from lit_methods.datamodules.fashion_mnist import FashionMNISTDataModule
from lit_methods.datamodules.federated import FederatedDataModule, OpenWorldFederatedDataModule
from lit_methods.datamodules.hard_batches import HardBatchDataModule
from lit_methods.datamodules.normalization import Normalize
from lit_methods.datamodules.imagenet import (
    DownsampledImageNetDataModule,
    ImageNet100DataModule,
    ImageNetDataModule,
    TinyImageNetDataModule,
)

__all__ = [
    "Batch",
    "Normalize",
    "as_batch",
    "CIFAR100BDataModule",
    "CIFAR100DataModule",
    "CIFAR100LTDataModule",
    "CIFAR10BDataModule",
    "CIFAR10DataModule",
    "CIFAR10LTDataModule",
    "DigitsDataModule",
    "DownsampledImageNetDataModule",
    "FashionMNISTDataModule",
    "FederatedDataModule",
    "HardBatchDataModule",
    "ImageNet100DataModule",
    "ImageNetDataModule",
    "InMemoryVisionDataModule",
    "WrappingDataModule",
    "OpenWorldFederatedDataModule",
    "TinyImageNetDataModule",
    "VisionDataModule",
]
from lit_methods.datamodules.continual import ClassIncrementalDataModule  # noqa: E402

__all__ += ["ClassIncrementalDataModule"]
