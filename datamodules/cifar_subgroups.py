"""CIFAR10-B and CIFAR100-B: CIFAR test splits with human-annotated background-colour subgroups (Chiu, Chen & Ma,
"Better May Not Be Fairer: A Study on Subgroup Discrepancy in Image Classification", ICCV 2023, arXiv:2212.08649).

The annotations are the published label files ``cifar10_bgd_cl2img_gp_fine.npy`` / ``cifar100_bgd_cl2img_gp_fine.npy``
(from the paper's dataset repository): a pickled dict ``{class name: {"NNNN.png": subgroup id}}`` in which
``NNNN`` numbers the images of that class in the order of the CIFAR test split. The test split of these datamodules
yields ``{"inputs": images, "targets": labels, "subgroup": subgroups}`` batches; training and validation are CIFAR's.

The label files are Python pickles: only load files you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lit_methods.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule

__all__ = ["CIFAR100BDataModule", "CIFAR10BDataModule", "read_subgroup_file"]


def read_subgroup_file(path: str | Path) -> dict[str, dict[str, int]]:
    """The ``{class name: {"NNNN.png": subgroup id}}`` dict of a published -B label file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: download the subgroup label file from the paper's dataset repository "
            "(charismaticchiu/Better-May-Not-Be-Fairer-...) and pass its path as subgroup_file"
        )
    try:
        table = np.load(path, allow_pickle=True).item()
        if not isinstance(table, dict):
            raise ValueError(f"expected a dict, found {type(table).__name__}")
        return {str(name): {str(k): int(v) for k, v in groups.items()} for name, groups in table.items()}
    except (ValueError, OSError, pickle.UnpicklingError, AttributeError, TypeError) as error:
        raise RuntimeError(f"{path} is not a subgroup label file ({type(error).__name__}: {error})") from error


class _SubgroupMixin:
    """Adds the subgroup ids of the test split to a CIFAR datamodule."""

    num_subgroups: int = 8
    subgroup_file_name: ClassVar[str]
    meta_file: ClassVar[str]
    meta_key: ClassVar[bytes]

    def _init_subgroups(self, subgroup_file: str | None) -> None:
        self.subgroup_file = Path(subgroup_file) if subgroup_file else self.data_dir / self.subgroup_file_name
        self.test_subgroups: Tensor | None = None

    def class_names(self) -> list[str]:
        path = self.data_dir / self.torchvision_dataset.base_folder / self.meta_file
        try:
            with path.open("rb") as f:
                return [name.decode() for name in pickle.load(f, encoding="bytes")[self.meta_key]]
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: it names the classes that the subgroup file is keyed by")
        except (pickle.UnpicklingError, EOFError, KeyError) as error:
            raise RuntimeError(f"{path} is truncated or corrupted ({type(error).__name__}: {error})") from error

    def subgroups_of(self, labels: Tensor) -> Tensor:
        """Subgroup id of every test image, matching the k-th image of each class to ``"{k:04d}.png"``."""
        table = read_subgroup_file(self.subgroup_file)
        subgroups = torch.full_like(labels, -1)
        for label, name in enumerate(self.class_names()):
            if name not in table:
                raise ValueError(f"{self.subgroup_file} has no class {name!r}")
            for k, position in enumerate(torch.nonzero(labels == label).flatten().tolist()):
                key = f"{k:04d}.png"
                if key not in table[name]:
                    raise ValueError(f"{self.subgroup_file} has no entry {name}/{key}")
                subgroups[position] = table[name][key]
        if subgroups.min() < 0 or subgroups.max() >= self.num_subgroups:
            raise ValueError(
                f"{self.subgroup_file}: subgroup ids must lie in [0, {self.num_subgroups}), "
                f"found {sorted(set(subgroups.tolist()))}"
            )
        return subgroups

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.test_images is not None and self.test_subgroups is None:
            self.test_subgroups = self.subgroups_of(self.test_labels)

    def test_dataloader(self) -> Any:
        return self.loader_of(self.test_images, self.test_labels, train=False, extras={"subgroup": self.test_subgroups})


class CIFAR10BDataModule(_SubgroupMixin, CIFAR10DataModule):
    """CIFAR10-B: CIFAR-10 whose test batches carry the 8 background-colour subgroups.

    Args:
        subgroup_file: path of ``cifar10_bgd_cl2img_gp_fine.npy`` (default: inside ``data_dir``).
        **kwargs: the arguments of :class:`~lit_methods.datamodules.CIFAR10DataModule`.
    """

    name: ClassVar[str] = "cifar10_b"
    subgroup_file_name: ClassVar[str] = "cifar10_bgd_cl2img_gp_fine.npy"
    meta_file: ClassVar[str] = "batches.meta"
    meta_key: ClassVar[bytes] = b"label_names"

    def __init__(self, subgroup_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_subgroups(subgroup_file)


class CIFAR100BDataModule(_SubgroupMixin, CIFAR100DataModule):
    """CIFAR100-B: CIFAR-100 (fine labels) whose test batches carry the background-colour subgroups.

    The number of subgroups is taken to be 8, as in CIFAR10-B (the paper's CIFAR-100 file was not inspected here);
    a file with other ids is rejected with the ids it holds.

    Args:
        subgroup_file: path of ``cifar100_bgd_cl2img_gp_fine.npy`` (default: inside ``data_dir``).
        **kwargs: the arguments of :class:`~lit_methods.datamodules.CIFAR100DataModule` (``label_type`` must stay "fine").
    """

    name: ClassVar[str] = "cifar100_b"
    subgroup_file_name: ClassVar[str] = "cifar100_bgd_cl2img_gp_fine.npy"
    meta_file: ClassVar[str] = "meta"
    meta_key: ClassVar[bytes] = b"fine_label_names"

    def __init__(self, subgroup_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.label_type != "fine":
            raise ValueError(f"CIFAR100-B subgroups annotate the fine classes, got label_type={self.label_type!r}")
        self._init_subgroups(subgroup_file)
