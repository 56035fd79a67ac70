"""MLC on scikit-learn's digits: spectral-clustering accuracy after MLC from a TCR start or a random start, for a few
``eta``, against k-means on the features MLC starts from (the figures quoted in the MLC docstring).

The protocol of ``tests/ssl/test_mlc_digits.py``: a 2-layer MLP (width 128), heads 64 -> ``d``, two views shifted by
up to one pixel, SGD (momentum 0.9, weight decay 1e-4) on batches of 256, TCR 200 steps at lr 0.05 (skipped for a
random start), MLC 300 steps at lr 0.01, one CPU thread. Run from the repository root::

    python scripts/mlc_digits_initialisation_study.py            # classes 0-3, d = 16 (~2 min)
    python scripts/mlc_digits_initialisation_study.py --classes 10 --feature-dim 32 --hidden-dim 128 --eta 0.2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor
from sklearn.cluster import KMeans

from lit_methods.datamodules.digits import DigitsDataModule, load_digits_uint8
from lit_methods.datamodules.fast import BatchAugment
from lit_methods.datamodules.normalization import Normalize
from lit_methods.ssl.clustering_metrics import clustering_accuracy
from lit_methods.ssl.mlc import MLC
from lit_methods.ssl.tcr import TCRPretrain
from tests.ssl.test_mlc_digits import TinyMLP, train_ssl  # the test's protocol, shared


def run(seed: int, eta: float, tcr_start: bool, args: argparse.Namespace) -> dict[str, float]:
    images, labels = load_digits_uint8()
    keep = labels < args.classes
    images, labels = images[keep], labels[keep]
    normalize = Normalize(DigitsDataModule.mean, DigitsDataModule.std)
    crop = BatchAugment(crop_padding=1, horizontal_flip=False, seed=seed)

    def augment(batch: Tensor) -> Tensor:
        return normalize(crop(batch))

    plain = normalize(images)
    torch.manual_seed(seed)
    tcr = TCRPretrain(TinyMLP(), num_classes=args.classes, hidden_dim=args.hidden_dim, feature_dim=args.feature_dim)
    if tcr_start:
        train_ssl(tcr, images, augment, steps=200, lr=0.05, seed=seed)
    tcr.eval()
    with torch.no_grad():
        start_features = F.normalize(tcr.feature_head(tcr(plain)), dim=1).numpy()
    kmeans = KMeans(args.classes, n_init=10, random_state=seed).fit_predict(start_features)
    mlc = MLC.from_pretrained(tcr, num_classes=args.classes, eta=eta)
    train_ssl(mlc, images, augment, steps=300, lr=0.01, seed=seed)
    mlc.eval()
    with torch.no_grad():
        mlc.clustering.update(mlc.cluster_head(mlc(plain)), labels)
    return {"kmeans": clustering_accuracy(labels.numpy(), kmeans), "mlc": mlc.clustering.compute()["acc"].item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=4, help="digits 0..classes-1")
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--eta", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for eta in args.eta:
        for tcr_start in (True, False):
            results = [run(seed, eta, tcr_start, args) for seed in args.seeds]
            start = "TCR" if tcr_start else "random"
            mlc = " / ".join(f"{r['mlc']:.3f}" for r in results)
            kmeans = " / ".join(f"{r['kmeans']:.3f}" for r in results)
            print(
                f"classes={args.classes} d={args.feature_dim} eta={eta} start={start}: MLC acc {mlc}, "
                f"k-means on the start features {kmeans} (seeds {args.seeds})",
                flush=True,
            )


if __name__ == "__main__":
    main()
