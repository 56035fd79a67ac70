"""Real-data checks on Fashion-MNIST (the Debian files; skipped when absent): brief self-supervised training of a
small ConvNet (SimSiam, Mixed Barlow Twins, SimCLR with the Hallucinator, TCR, the projection-head study) improves
the weighted-kNN accuracy of its backbone features over the same network at random init.

On 8x8 digits random ConvNet features already reach ~0.96 kNN accuracy, which leaves too little room to see a few
epochs of SimSiam, Mixed Barlow Twins, SimCLR with the Hallucinator or the projection-head study help; 28x28
Fashion-MNIST (random init ~0.79 here) leaves enough.

Setup shared by every case (seed 0 everywhere): ConvNet-2 (width 32, BatchNorm, 1568 pooled features), 300 training
images per class (3,000, drawn with seed 0), two fast-loader SSL views with crop scale (0.3, 1) (SimCLR's 0.08 lower
bound crops too much of a 28x28 garment), batch 64, 8 epochs of SGD with the base's warmup-cosine schedule.
Evaluation: weighted kNN (k=20, T=0.1) of the eval-mode backbone (pre-projection) features, the 3,000 un-augmented
training images as the bank and the 10,000 test images as queries. The methods' own defaults are kept except the
head widths (128, CPU-sized) and, for SimSiam and Mixed Barlow Twins, ``lr=0.1`` instead of the base's 0.3
(Mixed Barlow Twins at 0.3 lowered the accuracy below the random init: 0.790 -> 0.765 in 5 epochs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lit_methods.datamodules.fashion_mnist import FashionMNISTDataModule
from lit_methods.nets import ConvNet
from lit_methods.ssl.mixed_barlow_twins import MixedBarlowTwins
from lit_methods.ssl.projection_head import ProjectionHeadStudy
from lit_methods.ssl.simclr import SimCLR
from lit_methods.ssl.simsiam import SimSiam
from lit_methods.ssl.tcr import TCRPretrain
from tests.helpers import cpu_trainer, frozen_knn_accuracy

SEED = 0
SAMPLES_PER_CLASS = 300
EPOCHS = 8
BATCH_SIZE = 64
VIEW_SCALE = (0.3, 1.0)
KNN_K = 20

pytestmark = pytest.mark.skipif(
    FashionMNISTDataModule(data_dir="/nonexistent").find_split(train=True) is None
    or FashionMNISTDataModule(data_dir="/nonexistent").find_split(train=False) is None,
    reason="Fashion-MNIST files not found (Debian package dataset-fashion-mnist)",
)


def _backbone() -> ConvNet:
    return ConvNet(
        num_classes=10,
        in_channels=1,
        depth=2,
        width=32,
        norm="batchnorm",
        image_size=28,
    )


CASES: dict[str, tuple[type, dict[str, Any], float]] = {
    # name: (method, arguments, smallest accepted gain in kNN accuracy). Measured, seed 0, random init 0.789:
    # SimSiam 0.811, Mixed Barlow Twins 0.801, SimCLR + Hallucinator 0.799, projection-head study (MLP head,
    # pre-projection features) 0.809 with torch's default 2 threads (24-32 s each on a 2-core machine); with
    # 1 thread (other reduction order) 0.814, 0.801, 0.802, 0.801 (38-53 s). TCR (MLC's first stage) 0.814 with
    # 2 threads (28 s). The gains of 1-2 points are small, hence margins of half a point (1.5 for SimSiam and TCR).
    "simsiam": (
        SimSiam,
        {
            "projection_hidden_dim": 128,
            "projection_dim": 128,
            "projection_layers": 2,
            "prediction_hidden_dim": 32,
            "lr": 0.1,
        },
        0.015,
    ),
    "mixed_barlow_twins": (
        MixedBarlowTwins,
        {"projection_hidden_dim": 128, "projection_dim": 128, "lr": 0.1},
        0.005,
    ),
    "simclr_hallucinator": (
        SimCLR,
        {"projection_hidden_dim": 128, "projection_dim": 64, "hallucinator": True},
        0.005,
    ),
    "tcr": (
        TCRPretrain,
        {"hidden_dim": 128, "feature_dim": 64},
        0.015,
    ),
    "projection_head_study_mlp": (
        ProjectionHeadStudy,
        {"head": "mlp", "projection_hidden_dim": 128, "projection_dim": 64},
        0.005,
    ),
}


def _datamodule() -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        samples_per_class=SAMPLES_PER_CLASS,
        seed=SEED,
        batch_size=BATCH_SIZE,
        fast_loader=True,
        ssl_views=2,
        ssl_global_scale=VIEW_SCALE,
    )


@pytest.fixture(scope="module")
def random_init_accuracy() -> float:
    """kNN accuracy of the seed-0 backbone at random init, computed once for every case: each case seeds torch and
    builds the backbone before anything else, so all five start from these weights, and the SSL methods' forward is
    the backbone's ``forward_features`` on the (already normalized) inputs. Checked once by hand: each case's model
    as built gives bitwise this backbone's features (0.7886 here, as each case measured for itself before)."""
    torch.manual_seed(SEED)
    return frozen_knn_accuracy(_backbone(), _datamodule(), k=KNN_K)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_brief_training_on_fashion_mnist_improves_knn_accuracy_over_the_random_init(
    name, random_init_accuracy, tmp_path
):
    """Fashion-MNIST, seed 0: the kNN accuracy of the backbone features after 8 epochs beats the same network at
    random init (0.789) by the case's margin: 1.5 points for SimSiam and TCR (measured +2.2, +2.5), half a point for
    the others (measured +1.2, +1.0, +2.0; see CASES). The random-init figure is computed once (module fixture)."""
    method, kwargs, margin = CASES[name]
    torch.manual_seed(SEED)
    model = method(_backbone(), knn_k=KNN_K, **kwargs)
    trainer = cpu_trainer(
        max_epochs=EPOCHS, limit_val_batches=0, default_root_dir=tmp_path
    )
    datamodule = _datamodule()
    before = random_init_accuracy
    trainer.fit(model, datamodule=datamodule)
    after = frozen_knn_accuracy(model, datamodule, k=KNN_K)
    print(
        f"{name} Fashion-MNIST kNN accuracy, seed {SEED}: random init {before:.3f} -> trained {after:.3f}"
    )
    assert after >= before + margin
