"""FedoSSL: unbiased training in federated open-world semi-supervised learning (Zhang et al., ICML 2023,
arXiv:2305.00771; official code cugzj/FedoSSL, built on ORCA, Cao et al. arXiv:2102.03526).

Clients hold a few labelled images of the seen classes and unlabelled images of seen and unseen classes; an unseen
class may sit at several clients (locally unseen) or at one (globally unseen). Each client trains ORCA's objective
(labelled cross-entropy with an uncertainty-adaptive margin, pairwise BCE to a positive partner, a balance entropy
term) plus, once the server's global centroids are meaningful, a cluster-consistency loss and confident
pseudo-labels from those centroids. After local training it clusters its feature memory with Sinkhorn-balanced
k-means; the server concatenates every client's local centroids, trains the global centroids on them (Orchestra
style) and calibrates them so that slot ``i`` is the centroid nearest seen class ``i``'s labelled centroid.

Differences from the official code, on purpose: one augmented view (the code's pairwise and cluster losses compare
two views of a batch; here the positive partner is a second sample of the same batch, as in the code's unlabelled
pairs); the margin's uncertainty is the running mean over the client's unlabelled training batches (the code reads
it from the client's test data before each round). The code's class-weighted "suppressed" sharpening loss is
commented out in the released loss; it is left out here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.datamodules.batch import as_batch
from lit_methods.datamodules.federated import FederatedDataModule
from lit_methods.federated.core import ClientResult, FederatedMethod, StateDict, fedavg

__all__ = ["FedoSSL", "calibrate_centroids", "cluster_accuracy", "sinkhorn", "sinkhorn_kmeans"]

UNLABELLED = -1


def sinkhorn(scores: Tensor, epsilon_inverse: float = 25.0, iterations: int = 10) -> Tensor:
    """Sinkhorn-Knopp balanced soft assignment of ``N`` samples to ``K`` clusters from similarity ``scores``
    ``(N, K)``: every row sums to 1 and every column to ``N / K`` (SwAV, arXiv:2006.09882; the code's lambda=25)."""
    q = torch.exp((scores - scores.max()) * epsilon_inverse).T  # (K, N)
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * n
    return (q * n).T


def sinkhorn_kmeans(features: Tensor, num_clusters: int, iterations: int = 5, generator: torch.Generator | None = None) -> Tensor:
    """``num_clusters`` L2-normalised centroids of L2-normalised ``features`` by k-means whose assignment step is
    Sinkhorn-balanced (the code's ``local_clustering``), started from random samples."""
    if len(features) < num_clusters:
        raise ValueError(f"{len(features)} features cannot make {num_clusters} clusters")
    z = F.normalize(features, dim=1)
    centroids = z[torch.randperm(len(z), generator=generator)[:num_clusters]].clone()
    for _ in range(iterations):
        assignment = sinkhorn(z @ centroids.T).argmax(dim=1)
        for c in range(num_clusters):
            members = z[assignment == c]
            if len(members):
                centroids[c] = F.normalize(members.mean(dim=0), dim=0)
    return centroids


def cluster_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Accuracy under the best one-to-one map of predicted clusters to labels (Hungarian, scipy)."""
    if len(labels) == 0:
        return float("nan")
    pred, true = predictions.cpu().numpy(), labels.cpu().numpy()
    size = int(max(pred.max(), true.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (pred, true), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(true))


def hungarian_map(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``map[p]``: the label cluster ``p`` is matched to by :func:`cluster_accuracy`'s assignment."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (predictions.cpu().numpy(), labels.cpu().numpy()), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = torch.arange(num_classes)
    mapping[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return mapping


def calibrate_centroids(centroids: Tensor, labelled_centroids: Tensor, num_seen: int) -> Tensor:
    """Re-order ``centroids`` ``(C, d)`` so that slot ``i < num_seen`` holds the centroid most similar to seen class
    ``i``'s labelled centroid (greedy, most similar pair first, each centroid used once); the others fill the
    remaining slots in their order."""
    similarity = F.normalize(labelled_centroids[:num_seen], dim=1) @ F.normalize(centroids, dim=1).T
    order = torch.full((len(centroids),), -1, dtype=torch.long)
    used: set[int] = set()
    flat = similarity.flatten().argsort(descending=True)
    for index in flat.tolist():
        seen_class, centroid = divmod(index, len(centroids))
        if order[seen_class] >= 0 or centroid in used:
            continue
        order[seen_class] = centroid
        used.add(centroid)
        if len(used) == num_seen:
            break
    rest = [c for c in range(len(centroids)) if c not in used]
    order[num_seen:] = torch.tensor(rest, dtype=torch.long)
    return centroids[order]


class FedoSSL(FederatedMethod, ImageClassifier):
    """FedoSSL's client model: a backbone, a cosine classifier over all ``num_classes`` (seen and unseen) and the
    clustering state (see the module doc).

    Training batches carry ``targets == -1`` for unlabelled images. State: ``centroids`` (global, produced by the
    server), ``local_centroids`` (uploaded, concatenated by the server, never averaged), ``labelled_centroids``
    (per-class means of labelled features, averaged), ``memory`` (the last ``memory_size`` normalised features,
    client-private). The server averages every other tensor with equal weights, as the code does.

    Args:
        backbone: a :mod:`lit_methods.nets` backbone (its classifier is removed).
        num_seen: the seen classes are ``0 .. num_seen - 1``.
        scale: the cosine classifier's logit scale ``s`` (ORCA: 10); the margin is ``m * s``.
        temperature: ``T`` of the centroid soft assignment (code: 0.1).
        cluster_weight: weight of the cluster-consistency loss (code: 0.5).
        cluster_start_round: first round with the cluster loss (code: after round 4).
        pseudo_label_start_round: first round with centroid pseudo-labels (code: after round 6).
        pseudo_label_threshold: least centroid confidence of a pseudo-label (code: 0.95).
        local_clusters: centroids of each client's local clustering (code: 32).
        memory_size: features in the client's memory (code: 1024).
        server_steps: SGD steps training the global centroids (code: 500, lr 0.01, momentum 0.9, wd 1e-4).
        calibrate: re-order the global centroids to the seen classes (the paper's calibration; off for ablation).
        pretrained_checkpoint: the backbone's starting weights, e.g. a checkpoint of :class:`~lit_methods.ssl.SimCLR`
            on the same backbone (the paper starts from SimCLR), read with ``pretrained_key_map``; loaded at
            construction, so they are the federation's initial global weights.
        pretrained_key_map: source key prefix -> module key prefix (default ``{"backbone.": "backbone."}``: the
            backbone of any of our SSL methods' checkpoints; ``{"": "backbone."}`` for a plain backbone state dict).
        trainable_backbone_prefixes: backbone parameter-name prefixes that train (the code: ``["stages.3"]``, the
            last stage of our CIFAR ResNet-18, its ``layer4``); the rest of the backbone is frozen. ``None`` (the
            default) trains the whole backbone. The head always trains.
        **kwargs: the other arguments of :class:`~lit_methods.ImageClassifier` (code: SGD lr 0.1, momentum 0.9,
            weight decay 5e-4).
    """

    slug: ClassVar[str] = "fedossl"
    backbone_output = "features"
    private_prefixes: ClassVar[tuple[str, ...]] = ("memory", "labelled_sum", "labelled_count", "uncertainty")
    not_averaged: ClassVar[tuple[str, ...]] = ("centroids", "local_centroids")

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        num_seen: int = 6,
        scale: float = 10.0,
        temperature: float = 0.1,
        cluster_weight: float = 0.5,
        cluster_start_round: int = 4,
        pseudo_label_start_round: int = 6,
        pseudo_label_threshold: float = 0.95,
        local_clusters: int = 32,
        memory_size: int = 1024,
        server_steps: int = 500,
        calibrate: bool = True,
        pretrained_checkpoint: str | None = None,
        pretrained_key_map: dict[str, str] | None = None,
        trainable_backbone_prefixes: list[str] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "constant",
        **kwargs: Any,
    ) -> None:
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "reset_classifier")):
            raise ValueError(f"{type(backbone).__name__} has no forward_features/reset_classifier: use a lit_methods.nets backbone")
        num_classes = num_classes if num_classes is not None else getattr(backbone, "num_classes", None)
        backbone.reset_classifier(0)
        super().__init__(backbone, num_classes=num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, lr_schedule=lr_schedule, **kwargs)
        if not 1 <= num_seen < self.num_classes:
            raise ValueError(f"num_seen must lie in [1, num_classes={self.num_classes}), got {num_seen}")
        for name, value in (("scale", scale), ("temperature", temperature)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0.0 < pseudo_label_threshold <= 1.0:
            raise ValueError(f"pseudo_label_threshold must lie in (0, 1], got {pseudo_label_threshold}")
        if local_clusters < 1 or memory_size < local_clusters:
            raise ValueError(f"need 1 <= local_clusters <= memory_size, got {local_clusters} and {memory_size}")
        if server_steps < 0:
            raise ValueError(f"server_steps must be >= 0, got {server_steps}")
        dim = backbone.num_features
        self.num_seen = num_seen
        self.scale = scale
        self.temperature = temperature
        self.cluster_weight = cluster_weight
        self.cluster_start_round = cluster_start_round
        self.pseudo_label_start_round = pseudo_label_start_round
        self.pseudo_label_threshold = pseudo_label_threshold
        self.server_steps = server_steps
        self.calibrate = calibrate
        self.head = nn.Linear(dim, self.num_classes, bias=False)
        self.register_buffer("centroids", F.normalize(torch.randn(self.num_classes, dim), dim=1))
        self.register_buffer("local_centroids", torch.zeros(local_clusters, dim))
        self.register_buffer("labelled_centroids", torch.zeros(self.num_classes, dim))
        self.register_buffer("memory", torch.zeros(memory_size, dim))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("uncertainty", torch.zeros(()))
        self.register_buffer("labelled_sum", torch.zeros(self.num_classes, dim))
        self.register_buffer("labelled_count", torch.zeros(self.num_classes))
        self.round_index = 0
        if pretrained_checkpoint is not None:
            self.load_pretrained_weights(pretrained_checkpoint, pretrained_key_map or {"backbone.": "backbone."},
                                         source_name=f"pretrained_checkpoint {pretrained_checkpoint!r}")
        if trainable_backbone_prefixes is not None:
            self.freeze_backbone_except(trainable_backbone_prefixes)

    def freeze_backbone_except(self, prefixes: Sequence[str]) -> None:
        """Freeze every backbone parameter whose name starts with none of ``prefixes`` (each must match one)."""
        names = [name for name, _ in self.backbone.named_parameters()]
        unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in names)]
        if unmatched:
            raise ValueError(f"trainable_backbone_prefixes {unmatched} match no backbone parameter "
                             f"(its parameters begin {sorted({n.rsplit('.', 2)[0] for n in names})[:8]})")
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad_(name.startswith(tuple(prefixes)))

    # -- model --------------------------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised features."""
        return F.normalize(self.backbone.forward_features(self.normalize_inputs(x)), dim=1)

    def logits_of(self, z: Tensor) -> Tensor:
        return self.scale * z @ F.normalize(self.head.weight, dim=1).T

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_of(self.embed(x))

    # -- training -----------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        self.round_index = int(getattr(datamodule, "round_index", 0))

    def positive_partners(self, z: Tensor, targets: Tensor) -> Tensor:
        """Index of each sample's positive partner in the batch: a random other labelled sample of its class
        (itself when none), or for an unlabelled sample its nearest neighbour in feature cosine."""
        n = len(z)
        similarity = z.detach() @ z.detach().T
        similarity.fill_diagonal_(-2.0)
        partners = similarity.argmax(dim=1)
        labelled = targets != UNLABELLED
        if labelled.any():
            same = (targets[:, None] == targets[None, :]) & labelled[:, None] & labelled[None, :]
            same &= ~torch.eye(n, dtype=torch.bool, device=z.device)
            random_scores = torch.rand(n, n, device=z.device).masked_fill(~same, -1.0)
            has_partner = same.any(dim=1)
            labelled_partners = torch.where(has_partner, random_scores.argmax(dim=1), torch.arange(n, device=z.device))
            partners = torch.where(labelled, labelled_partners, partners)
        return partners

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        x, targets = batch["inputs"], batch["targets"]
        z = self.embed(x)
        logits = self.logits_of(z)
        prob = logits.softmax(dim=1)
        labelled = targets != UNLABELLED
        unlabelled = ~labelled
        if unlabelled.any():  # running mean of the uncertainty on this client's unlabelled data
            batch_uncertainty = (1 - prob[unlabelled].detach().max(dim=1).values).mean()
            self.uncertainty.copy_(0.9 * self.uncertainty + 0.1 * batch_uncertainty)
        margin = min(float(self.uncertainty), 0.5)
        zero = logits.sum() * 0
        ce = zero
        if labelled.any():
            onehot = F.one_hot(targets[labelled], self.num_classes).to(logits.dtype)
            ce = F.cross_entropy(logits[labelled] - margin * self.scale * onehot, targets[labelled])
        partners = self.positive_partners(z, targets)
        bce = -torch.log((prob * prob[partners]).sum(dim=1).clamp_min(1e-7)).mean()
        mean_prob = prob.mean(dim=0)
        entropy = -(mean_prob * torch.log(mean_prob.clamp_min(1e-7))).sum()
        loss = ce + bce - entropy
        cluster = pseudo = zero
        if self.round_index >= self.cluster_start_round:
            q = (z @ self.centroids.T / self.temperature).softmax(dim=1)
            cluster = -(q.detach() * torch.log(q[partners].clamp_min(1e-7))).sum(dim=1).mean()
            loss = loss + self.cluster_weight * cluster
            if self.round_index >= self.pseudo_label_start_round:
                confidence, cluster_ids = q.detach().max(dim=1)
                chosen = unlabelled & (confidence > self.pseudo_label_threshold)
                if chosen.any():
                    pseudo = F.cross_entropy(logits[chosen], cluster_ids[chosen])
                    loss = loss + pseudo
        self.remember(z.detach(), targets)
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/bce": bce, "train/entropy": entropy,
                       "train/cluster": cluster, "train/pseudo": pseudo}, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def remember(self, z: Tensor, targets: Tensor) -> None:
        """Add the labelled features to the per-class sums and push ``z`` into the FIFO memory."""
        labelled = targets != UNLABELLED
        if labelled.any():
            self.labelled_sum.index_add_(0, targets[labelled], z[labelled])
            self.labelled_count.index_add_(0, targets[labelled], torch.ones(int(labelled.sum()), device=z.device))
        size = len(self.memory)
        z = z[-size:]
        positions = (self.memory_next + torch.arange(len(z), device=z.device)) % size
        self.memory[positions] = z
        self.memory_next.copy_((self.memory_next + len(z)) % size)
        self.memory_filled.copy_(torch.clamp(self.memory_filled + len(z), max=size))

    def on_train_end(self) -> None:
        """Local clustering of the memory and the labelled centroids of this local update."""
        filled = int(self.memory_filled)
        if filled >= len(self.local_centroids):
            # seeded from the state, not the global generator, so a resumed fit draws what the uninterrupted one does
            generator = torch.Generator().manual_seed(int(self.memory_next) + 7919 * self.round_index)
            self.local_centroids.copy_(sinkhorn_kmeans(self.memory[:filled].cpu(), len(self.local_centroids),
                                                       generator=generator).to(self.device))
        seen = self.labelled_count > 0
        if seen.any():
            means = self.labelled_sum[seen] / self.labelled_count[seen, None]
            self.labelled_centroids[seen] = F.normalize(means, dim=1)

    def load_states(self, global_state: Any, client_state: Any) -> None:
        """Load the states for a local update; the labelled-feature sums restart with every update."""
        super().load_states(global_state, client_state)
        self.labelled_sum.zero_()
        self.labelled_count.zero_()

    # -- server -------------------------------------------------------------------------------------------------
    def aggregate(self, results: Sequence[ClientResult], round_index: int) -> StateDict:
        """Equal-weight FedAvg of the shared tensors, then the global centroids trained on every client's local
        centroids and (with ``calibrate``) aligned to the seen classes."""
        averaged_keys = [k for k in results[0].global_state if not k.startswith(self.not_averaged)]
        new_state = fedavg([{k: r.global_state[k] for k in averaged_keys} for r in results], [1.0] * len(results))
        local = torch.cat([r.global_state["local_centroids"] for r in results])
        centroids = self.train_global_centroids(results[0].global_state["centroids"], local)
        if self.calibrate:
            centroids = calibrate_centroids(centroids, new_state["labelled_centroids"], self.num_seen)
        new_state["centroids"] = centroids
        new_state["local_centroids"] = results[0].global_state["local_centroids"]
        return new_state

    def train_global_centroids(self, initial: Tensor, local: Tensor) -> Tensor:
        """Orchestra-style global clustering: ``server_steps`` SGD steps (lr 0.01, momentum 0.9, wd 1e-4) raising
        the cosine between each local centroid's soft assignment and its Sinkhorn-balanced target, re-normalising
        the centroids after each step."""
        centroids = nn.Parameter(F.normalize(initial.detach().clone().float(), dim=1))
        optimizer = torch.optim.SGD([centroids], lr=0.01, momentum=0.9, weight_decay=1e-4)
        z = F.normalize(local.float(), dim=1)
        with torch.enable_grad():
            for _ in range(self.server_steps):
                scores = z @ centroids.T
                with torch.no_grad():
                    target = sinkhorn(scores)
                soft = (scores / self.temperature).softmax(dim=1)
                loss = -F.cosine_similarity(soft, target, dim=1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    centroids.copy_(F.normalize(centroids, dim=1))
        return centroids.detach()

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batches: Iterable[Any], datamodule: FederatedDataModule) -> tuple[Tensor, Tensor]:
        was_training = self.training
        self.eval()
        predictions, labels = [], []
        try:
            for raw in batches:
                batch = as_batch(datamodule.dataset.on_after_batch_transfer(raw, 0))
                predictions.append(self(batch["inputs"].to(self.device)).argmax(dim=1).cpu())
                labels.append(batch["targets"].cpu())
        finally:
            self.train(was_training)
        return torch.cat(predictions), torch.cat(labels)

    def federation_metrics(self, datamodule: FederatedDataModule) -> dict[str, float]:
        """Seen accuracy (argmax), unseen and overall accuracy (Hungarian), and each unseen class's accuracy under
        the unseen Hungarian map, on the test images of the classes the federation holds."""
        datamodule.dataset.setup("test")
        predictions, labels = self.predict(datamodule.dataset.test_dataloader(), datamodule)
        held = torch.isin(labels, torch.unique(datamodule.dataset.train_labels[torch.cat(datamodule.shards)]))
        predictions, labels = predictions[held], labels[held]
        seen = labels < self.num_seen
        metrics = {
            "seen_acc": (predictions[seen] == labels[seen]).float().mean().item(),
            "unseen_acc": cluster_accuracy(predictions[~seen], labels[~seen]),
            "all_acc": cluster_accuracy(predictions, labels),
        }
        mapping = hungarian_map(predictions[~seen], labels[~seen], self.num_classes)
        for c in torch.unique(labels[~seen]).tolist():
            of_class = labels == c
            metrics[f"class_{c}_acc"] = (mapping[predictions[of_class]] == c).float().mean().item()
        return metrics
