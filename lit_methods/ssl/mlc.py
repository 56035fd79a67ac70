"""MLC (Ding, Tong, Chan, Dai, Ma, Haeffele, "Unsupervised Manifold Linearizing and Clustering", ICCV 2023,
https://arxiv.org/abs/2301.01805)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import read_checkpoint
from lit_methods.datamodules.batch import as_batch
from lit_methods.losses.mcr2 import MCR2MembershipLoss, sinkhorn_membership
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.clustering_metrics import MembershipSpectralClustering
from lit_methods.ssl.tcr import coding_rate_head

__all__ = ["MLC"]

# pretrained_source -> (the source module's head attribute, its key prefixes -> ours); MoCo v2's projector is
# Linear(0)-ReLU(1)-Linear(2), our head without BatchNorm Linear(0)-Identity(1)-ReLU(2)-Linear(3)
PRETRAINED_HEADS: dict[str, tuple[str, dict[str, str]]] = {
    "tcr": ("feature_head", {"feature_head.": "feature_head."}),
    "moco_v2": ("projector", {"projector.0.": "feature_head.0.", "projector.2.": "feature_head.3."}),
}


class MLC(SSLMethod):
    """Maximal coding-rate reduction over the network and a doubly stochastic point-to-point membership.

    Per step, with ``A`` augmented views: ``Z = normalize(mean_a normalize(feature_head(f_a)))`` and
    ``G = mean_a Sinkhorn(C_a^T C_a / eta)`` with ``C_a = normalize(cluster_head(f_a))``; the loss is
    ``-(R(Z) - R_c(Z, G))`` (:mod:`lit_methods.losses.mcr2`). Validation clusters the whole epoch: spectral
    clustering of ``Sinkhorn`` over every validation image's cluster-head output, reported as ``val/cluster_acc``
    (Hungarian matching) and ``val/cluster_nmi``, next to the base's probe and kNN monitors.

    **Initialisation (the paper's two stages).** MLC starts from a self-supervised network: stage 1 is
    :class:`~lit_methods.ssl.tcr.TCRPretrain`; stage 2 copies its backbone and feature head here and the feature head
    also into the cluster head, so ``G`` starts as ``Sinkhorn(Z^T Z / eta)`` of the pretrained features. Two ways:

    * ``pretrained_checkpoint`` (for the CLI: ``model.init_args.pretrained_checkpoint: path/to/tcr.ckpt``): a
      TCRPretrain checkpoint read when training or evaluation starts (:meth:`setup`, or
      :meth:`load_pretrained_checkpoint` outside a Trainer), as :class:`~lit_methods.ssl.LinearEvaluation` reads its
      SSL checkpoint: so a stage-2 config can name the stage-1 file before it exists, and ``load_from_checkpoint``
      of an MLC run (which holds the weights, and a ``pretrained_loaded`` flag) does not read it again. Its
      ``backbone.*`` and ``feature_head.*`` entries must match this model's layers exactly (a ``ValueError`` naming
      the differences otherwise). Resuming an MLC fit reads it once more before the MLC checkpoint overwrites it.
    * :meth:`from_pretrained` (in Python): from a TCRPretrain module, copying its backbone and head sizes.

    ``pretrained_source="moco_v2"`` starts from a :class:`~lit_methods.ssl.MoCoV2` checkpoint instead (the paper's
    best CIFAR result, MLC-MoCoV2): its online ``backbone`` and its ``projector`` (Linear-ReLU-Linear) become the
    backbone and the feature head (and the cluster head), which then has no BatchNorm (``head_batch_norm=False``,
    required) so that the copied heads compute exactly the projector's function; the momentum encoder, the queue
    and the probe are not read.

    Without either, the cluster head is a copy of the randomly initialised feature head. Measured on digits
    (``scripts/mlc_digits_initialisation_study.py``: tiny MLP, 200 TCR steps then 300 MLC steps, spectral
    clustering accuracy for seeds 0/1/2). Classes 0-3, ``d = 16``: with ``eta = 0.1`` the membership drifts towards
    the trivial ``G = I`` (``R_c`` is smallest there whatever ``Z`` is) and MLC ends at 0.34/0.33/0.33 from a random
    start and 0.59/0.58/0.63 from TCR, below k-means on the TCR features (0.68/0.64/0.54); with ``eta = 0.2`` it
    reaches 0.96/0.95/0.96 from TCR and as much from a random start (0.96/0.96/0.96; k-means on the pixels: 0.88).
    All 10 classes, ``d = 32``, ``eta = 0.2``: 0.93/0.92/0.83 from TCR against 0.66/0.61/0.62 from a random start
    (k-means: 0.56/0.61/0.54 on the TCR features, 0.79 on the pixels). ``tests/ssl/test_mlc_digits.py`` checks
    classes 4-7, held out from the tuning: 0.99/0.94/0.98 against k-means on the TCR features 0.48/0.89/0.55 (k-means
    on the pixels, 0.975, is stronger on those easy classes). The paper's ``eps``, ``eta``, Sinkhorn rounds and head width are in its appendix, which we
    could not read, and no official code was found: the defaults are MCR^2's ``eps^2 = 0.5`` and an ``eta`` tuned
    on digits, exposed as arguments.

    Args:
        hidden_dim: hidden width of the two heads (Linear-BN-ReLU-Linear).
        feature_dim: output width ``d`` of the two heads (128 in the paper).
        eps: coding-rate precision.
        eta: Sinkhorn entropy coefficient (smaller: sparser membership). 0.2 is tuned on digits from a TCR start
            (4 classes, ``d = 16``, 3 seeds, among 0.05, 0.1, 0.2, 0.3, 0.5): at 0.1 and 0.05 the membership's
            diagonal mass grows during training (towards ``G = I``) and the clustering falls below its starting
            point; 0.3 does about as well as 0.2; at 0.5 the membership is flatter and the accuracy lower.
        sinkhorn_iterations: Sinkhorn row/column normalisation rounds (unrolled in the loss).
        entropy_weight: weight of an extra entropy bonus on the membership (not in the paper, whose only entropy
            term is the Sinkhorn projection's own regulariser ``eta``; 0, the default, is the paper's loss; see
            :class:`~lit_methods.losses.mcr2.MCR2MembershipLoss`).
        head_batch_norm: a BatchNorm between the heads' two layers (TCR's head; ``False`` for MoCo v2's projector).
        pretrained_checkpoint: a checkpoint whose backbone and head start this model (and its cluster head), read
            at :meth:`setup`; ``None``: random initialisation.
        pretrained_source: what wrote ``pretrained_checkpoint``: ``"tcr"`` (:class:`~lit_methods.ssl.tcr.TCRPretrain`,
            its ``feature_head``) or ``"moco_v2"`` (:class:`~lit_methods.ssl.MoCoV2`, its ``projector``).
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod` (``num_classes`` is the number of clusters).
    """

    slug: ClassVar[str] = "mlc"

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        feature_dim: int = 128,
        eps: float = 0.5**0.5,
        eta: float = 0.2,
        sinkhorn_iterations: int = 10,
        entropy_weight: float = 0.0,
        head_batch_norm: bool = True,
        pretrained_checkpoint: str | None = None,
        pretrained_source: Literal["tcr", "moco_v2"] = "tcr",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if eta <= 0 or sinkhorn_iterations < 1:
            raise ValueError(f"need eta > 0 and sinkhorn_iterations >= 1, got eta={eta}, {sinkhorn_iterations}")
        if pretrained_source not in PRETRAINED_HEADS:
            raise ValueError(f"pretrained_source must be one of {sorted(PRETRAINED_HEADS)}, got {pretrained_source!r}")
        if pretrained_source == "moco_v2" and head_batch_norm:
            raise ValueError(
                "pretrained_source='moco_v2' copies MoCo v2's projector (Linear-ReLU-Linear, no BatchNorm): "
                "set head_batch_norm=False, got head_batch_norm=True"
            )
        self.eta = eta
        self.sinkhorn_iterations = sinkhorn_iterations
        self.pretrained_source = pretrained_source
        self.feature_head = coding_rate_head(self.num_features, hidden_dim, feature_dim, head_batch_norm)
        self.cluster_head = coding_rate_head(self.num_features, hidden_dim, feature_dim, head_batch_norm)
        self.loss_fn = MCR2MembershipLoss(eps, entropy_weight)
        self.clustering = MembershipSpectralClustering(self.knn.num_classes, eta, sinkhorn_iterations)
        self.pretrained_checkpoint = pretrained_checkpoint
        # set once pretrained weights are in: a restored MLC checkpoint has them and does not read the TCR file again
        self.register_buffer("pretrained_loaded", torch.tensor(False))
        self.cluster_head.load_state_dict(self.feature_head.state_dict())

    def setup(self, stage: str) -> None:
        if self.pretrained_checkpoint is not None and not self.pretrained_loaded:
            self.load_pretrained_checkpoint(self.pretrained_checkpoint)

    def load_pretrained_checkpoint(self, path: str) -> None:
        """Start from the backbone and head of a TCRPretrain or MoCoV2 Lightning checkpoint (:meth:`load_pretrained`)."""
        checkpoint = read_checkpoint(path)
        if "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
        self.load_pretrained(checkpoint["state_dict"], source=path)

    @classmethod
    def from_pretrained(cls, pretrained: nn.Module, **kwargs: Any) -> MLC:
        """An MLC starting from ``pretrained``: a :class:`~lit_methods.ssl.tcr.TCRPretrain` (its ``feature_head``)
        or a :class:`~lit_methods.ssl.MoCoV2` (its ``projector``, with ``pretrained_source="moco_v2"`` in
        ``kwargs``): a copy of its backbone, its head widths, and its backbone and head weights (the head also in the
        cluster head). ``pretrained`` is left untouched; ``kwargs`` are the other arguments of :class:`MLC`."""
        source = kwargs.get("pretrained_source", "tcr")
        head_name = PRETRAINED_HEADS.get(source, ("feature_head",))[0]
        for name in ("backbone", head_name):
            if not isinstance(getattr(pretrained, name, None), nn.Module):
                raise TypeError(f"{type(pretrained).__name__} has no {name} module to start MLC from")
        head = getattr(pretrained, head_name)
        widths = {"hidden_dim": head[0].out_features, "feature_dim": head[-1].out_features}
        if source == "moco_v2":
            widths["head_batch_norm"] = False
        model = cls(copy.deepcopy(pretrained.backbone), **(widths | kwargs))
        model.load_pretrained(pretrained.state_dict(), source=type(pretrained).__name__)
        return model

    def load_pretrained(self, state_dict: dict[str, Tensor], source: str = "the state dict") -> None:
        """Copy the ``backbone.*`` and head entries (``feature_head.*`` of TCR, ``projector.*`` of MoCo v2, by
        ``pretrained_source``) of a pretrained state dict into this model's backbone and feature head, and the
        feature head into the cluster head. The keys and shapes must match exactly (``ValueError`` naming the
        differences otherwise); other entries (a probe, a momentum encoder, a queue) are ignored."""
        _, head_map = PRETRAINED_HEADS[self.pretrained_source]
        self.load_pretrained_weights(state_dict, {"backbone.": "backbone.", **head_map}, strict=True, source_name=source)
        self.cluster_head.load_state_dict(self.feature_head.state_dict())
        self.pretrained_loaded.fill_(True)

    def features_and_membership(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``Z`` (``(n, d)``, unit rows, averaged over views) and ``G`` (``(n, n)``, averaged over views)."""
        views_z = [F.normalize(self.feature_head(f), dim=1) for f in features]
        z = F.normalize(torch.stack(views_z).mean(0), dim=1)
        memberships = [
            sinkhorn_membership(
                F.normalize(self.cluster_head(f), dim=1),
                self.eta,
                self.sinkhorn_iterations,
            )
            for f in features
        ]
        return z, torch.stack(memberships).mean(0)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        return self.loss_fn(*self.features_and_membership(features))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        batch = as_batch(batch)
        self.clustering.update(self.cluster_head(self(batch["inputs"])), batch["targets"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        scores = self.clustering.compute()
        self.log_dict({"val/cluster_acc": scores["acc"], "val/cluster_nmi": scores["nmi"]})
        self.clustering.reset()
