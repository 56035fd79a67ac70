"""CaBaGe: data-free model extraction with a class-balanced generator ensemble (Rosenthal, Enouen, Pham, Tan, ECCV 2024,
arXiv:2409.10643), on the DisGUIDE pipeline of the same group (Rosenthal et al., AAAI 2023, arXiv:2208.08464,
``lin-tan/disguide``).

An attacker with black-box query access to a victim classifier and no data trains an ensemble of clones on synthetic
images. Every query round (one training step):

1. **generator step** (DisGUIDE): each generator maximises the clones' disagreement, ``-mean_{batch, class}
   std_e(p_e)``, plus ``lambda_div * sum_k pbar_k log pbar_k`` (the entropy of the batch-mean prediction: class balance);
   only the clones' outputs enter it, never the victim;
2. **selective filtering** (CaBaGe): ``filter_ratio * B`` candidates are drawn from the generator ensemble; the ``B``
   hardest by clone disagreement are kept under per-class quotas on the clones' consensus class (``ceil(B / classes)``
   each; classes left short are topped up with the candidates the clones find most likely theirs), and only these are
   sent to the victim: the query counter grows by ``B`` (:func:`select_balanced_hard`);
3. **clone step** on ``(x, V(x))`` (cross-entropy on hard labels, L1 between centred clone logits and centred victim
   log-probabilities on a probability API), the pairs enter a replay memory, and ``replay_iters`` more clone steps run
   on replayed batches: with ``hard_replay`` the ``B`` replayed pairs are the worst-fitted (highest clone loss) of
   ``filter_ratio * B`` drawn uniformly from the memory, else ``B`` drawn uniformly.

With ``unknown_num_classes`` (hard labels only) the clones' head is used only up to the number of distinct victim
labels seen so far: clone output ``j`` stands for the ``j``-th label seen (``seen_labels``), the head grows as labels
appear (outputs past it are masked), and the quotas follow it. The victim's weights are never modified: it is held
outside the module's parameters, in eval mode, with ``requires_grad=False``, queried under ``no_grad``.

No official CaBaGe code could be read (no repository in reach; of the paper only the abstract and the start of the
introduction): the DisGUIDE parts were checked against its code (``lin-tan/disguide``, ``train.py``, ``replay.py``,
``my_utils.py``): same generator loss, one clone step per fresh or replayed batch, FIFO memory, and the soft-label L1
between raw clone logits and the victim's mean-centred log-probabilities. DisGUIDE samples its queries with the
generator in eval mode; here they come in train mode (see :meth:`CaBaGe._sample`). The filter, the hard replay and the
class-count growth are this implementation's reading of the CaBaGe abstract. On digits (3,840 label queries, 3 seeds)
the clones agree with the victim more than DisGUIDE-lite's (0.30 against 0.26), and the queried labels are more
balanced on average (entropy 1.48 against 1.36 nats) but not for every seed (1.63 against 1.64 for one): the filter
balances over the clones' consensus classes, and the candidates it picks reach only 1.0-1.5 nats of consensus entropy
(log 10 = 2.3), since few candidates look like most classes to clones trained on few labels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lit_methods.base import MethodBase, drop_object_hyperparameters, load_pretrained_weights
from lit_methods.datamodules import Normalize
from lit_methods.datamodules.batch import as_batch

__all__ = ["BlackBoxVictim", "CaBaGe", "DataFreeDataModule", "ImageGenerator", "select_balanced_hard"]


class BlackBoxVictim:
    """A trained classifier behind a query API: :meth:`query` returns hard labels (``"label"``) or probabilities
    (``"probability"``) of [0, 1] pixel batches, and counts every image it is asked about (``forward_passes``, images
    through the model). The model is put in eval mode with ``requires_grad=False`` and only ever run under
    ``no_grad``, so no gradient reaches it and its weights never change.

    Args:
        model: the victim's network, mapping normalised images to logits.
        output: what a query returns.
        mean: per-channel mean of the victim's input normalisation (its data's).
        std: per-channel standard deviation of the victim's input normalisation.
    """

    def __init__(
        self,
        model: nn.Module,
        output: Literal["label", "probability"] = "label",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if output not in ("label", "probability"):
            raise ValueError(f"output must be 'label' or 'probability', got {output!r}")
        self.model = model.eval().requires_grad_(False)
        self.output = output
        self.normalize = Normalize(mean, std) if mean is not None and std is not None else None
        self.forward_passes = 0
        self.evaluation_passes = 0

    def to(self, device: torch.device) -> BlackBoxVictim:
        self.model.to(device)
        if self.normalize is not None:
            self.normalize.to(device)
        return self

    @torch.no_grad()
    def _answer(self, pixels: Tensor) -> Tensor:
        x = pixels.detach()
        x = self.normalize(x) if self.normalize is not None else x
        self.model.eval()
        logits = self.model(x)
        return logits.argmax(dim=1) if self.output == "label" else logits.softmax(dim=1)

    def query(self, pixels: Tensor) -> Tensor:
        """The attacker's query: labels (``int64``) or probabilities of ``pixels`` (``(N, C, H, W)`` in [0, 1]);
        adds ``N`` to ``forward_passes``."""
        answers = self._answer(pixels)
        self.forward_passes += len(pixels)
        return answers

    def evaluate(self, pixels: Tensor) -> Tensor:
        """The same answers for measuring a clone on real data (not an attack query: counted in
        ``evaluation_passes``)."""
        answers = self._answer(pixels)
        self.evaluation_passes += len(pixels)
        return answers


class ImageGenerator(nn.Module):
    """Noise to [0, 1] images: ``"dcgan"`` is the DFME/DisGUIDE generator (linear to ``128 x s/4 x s/4``, two
    upsample-conv-BN-LeakyReLU stages, a conv and tanh); ``"mlp"`` is a two-layer perceptron with a tanh output (the
    card's CPU check). The tanh output is mapped to [0, 1] pixels.

    Args:
        latent_dim: noise size (DisGUIDE: 256).
        in_channels: image channels (filled from the data by the CLI).
        image_size: image side, or (height, width) of a square image (a multiple of 4 for ``"dcgan"``).
        kind: ``"dcgan"`` or ``"mlp"``.
        hidden: hidden width of ``"mlp"`` (``"dcgan"`` uses 128 and 64 channels).
    """

    def __init__(
        self,
        latent_dim: int = 256,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        kind: Literal["dcgan", "mlp"] = "dcgan",
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int):
            height, width = image_size
            if height != width:
                raise ValueError(f"ImageGenerator makes square images, got image_size={tuple(image_size)}")
            image_size = height
        channels = in_channels
        if latent_dim < 1 or channels < 1 or image_size < 1 or hidden < 1:
            raise ValueError(
                f"latent_dim, channels, image_size and hidden must be >= 1, got {latent_dim}, {channels}, "
                f"{image_size}, {hidden}"
            )
        if kind not in ("dcgan", "mlp"):
            raise ValueError(f"kind must be 'dcgan' or 'mlp', got {kind!r}")
        if kind == "dcgan" and image_size % 4:
            raise ValueError(f"the dcgan generator needs an image_size divisible by 4, got {image_size}")
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                nn.Linear(hidden, channels * image_size * image_size),
                nn.Unflatten(1, (channels, image_size, image_size)), nn.Tanh(),
            )
        else:
            side = image_size // 4
            self.net = nn.Sequential(
                nn.Linear(latent_dim, 128 * side * side), nn.Unflatten(1, (128, side, side)), nn.BatchNorm2d(128),
                nn.Upsample(scale_factor=2), nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
                nn.Upsample(scale_factor=2), nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),
                nn.Conv2d(64, channels, 3, padding=1), nn.Tanh(),
            )

    def forward(self, z: Tensor) -> Tensor:
        return (self.net(z) + 1.0) / 2.0


def select_balanced_hard(hardness: Tensor, class_probs: Tensor, count: int) -> Tensor:
    """Indices of ``count`` candidates, balanced over the classes and hard.

    ``class_probs`` (``(N, K)``) are the clones' mean probabilities. Each class takes, by decreasing ``hardness``,
    up to ``ceil(count / K)`` of the candidates whose consensus (argmax) it is; a class left short is then topped up,
    class by class in round-robin, with the untaken candidates of highest probability for it, so the queried set
    covers every class the clones can point to."""
    n, num_classes = class_probs.shape
    if count > n:
        raise ValueError(f"cannot select {count} of {n} candidates")
    quota = math.ceil(count / num_classes)
    order = torch.argsort(hardness, descending=True, stable=True)
    ranked_classes = class_probs.argmax(dim=1)[order]
    one_hot = F.one_hot(ranked_classes, num_classes)
    rank_in_class = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # rank within its class, in hardness order
    first = order[rank_in_class < quota]
    taken = torch.zeros(n, dtype=torch.bool, device=hardness.device)
    per_class = torch.zeros(num_classes, dtype=torch.long, device=hardness.device)
    chosen: list[Tensor] = []
    for index in first[:count]:
        taken[index] = True
        per_class[class_probs[index].argmax()] += 1
        chosen.append(index)
    by_class = torch.argsort(class_probs, dim=0, descending=True, stable=True)  # (N, K)
    cursor = [0] * num_classes
    while len(chosen) < count:
        short = [k for k in range(num_classes) if per_class[k] < quota] or list(range(num_classes))
        for k in short:
            if len(chosen) == count:
                break
            while taken[by_class[cursor[k], k]]:
                cursor[k] += 1
            index = by_class[cursor[k], k]
            taken[index] = True
            per_class[k] += 1
            chosen.append(index)
    return torch.stack(chosen) if chosen else order[:0]


class _Steps(Dataset):
    """``length`` empty training items: the step clock of a data-free method (no image is ever read)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"step": torch.tensor(index)}


class DataFreeDataModule(L.LightningDataModule):
    """A data-free attack's datamodule: training batches are ``{"step": ...}`` placeholders (``steps_per_epoch`` per
    epoch; the attacker reads no data), validation and test batches are ``datamodule``'s real ones (to measure the
    clones). The data facts are ``datamodule``'s.

    Args:
        datamodule: the dataset the victim was trained on (its test split measures the clones).
        steps_per_epoch: query rounds per Lightning epoch.
    """

    def __init__(self, datamodule: L.LightningDataModule, steps_per_epoch: int = 100) -> None:
        super().__init__()
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.datamodule = datamodule
        self.steps_per_epoch = steps_per_epoch

    num_classes = property(lambda self: self.datamodule.num_classes)
    in_channels = property(lambda self: self.datamodule.in_channels)
    image_size = property(lambda self: self.datamodule.image_size)
    mean = property(lambda self: self.datamodule.mean)
    std = property(lambda self: self.datamodule.std)

    @property
    def inputs_normalized(self) -> bool:
        """Always ``False``: the attack works on [0, 1] pixels (set ``normalize: false`` on the wrapped dataset)."""
        return False

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if getattr(self.datamodule, "inputs_normalized", False):
            raise ValueError("DataFreeDataModule measures clones on [0, 1] pixels: build the dataset with normalize=False")
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.steps_per_epoch), batch_size=1)

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "step" in batch:
            return batch
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)


class CaBaGe(MethodBase):
    """Data-free extraction of a black-box victim with a class-balanced generator ensemble (see the module doc).

    Trains with a :class:`DataFreeDataModule`: one training step is one query round of ``batch_size`` queries; the
    run stops when ``query_budget`` queries are spent (or at the trainer's limits). ``queries`` (the counter),
    ``label_counts`` (victim labels of the queried images), ``seen_labels``, the clones, the generators, both
    optimizers and the replay memory are in checkpoints, so a resumed run continues exactly. Validation reports the
    clone ensemble's soft-vote accuracy (``val/clone_acc``) and its agreement with the victim
    (``val/agreement``; these victim calls are evaluation, counted apart from the queries).

    Baseline DisGUIDE-lite: ``num_generators=1, filter_ratio=1, hard_replay=False``.

    Args:
        victim: the victim's network (architecture), loaded from ``victim_checkpoint``.
        victim_checkpoint: a Lightning checkpoint of one of our classifiers (its ``backbone.*`` weights) or a plain
            ``state_dict`` of ``victim``; ``None`` keeps ``victim``'s own weights (a victim built in Python, or a
            smoke test with a random victim).
        clone: the clone architecture; ``num_clones`` copies are made, each re-initialised.
        victim_output: the victim API: ``"label"`` (hard labels) or ``"probability"``.
        num_clones: E >= 2 (disagreement needs two).
        num_generators: M generators, each a copy of ``generator`` re-initialised.
        generator: the generator (default: :class:`ImageGenerator` ``"dcgan"`` of the data's size).
        query_budget: total victim queries (DisGUIDE CIFAR-10: 20M).
        batch_size: queries per round (DisGUIDE: 256).
        filter_ratio: candidates generated per query (r >= 1; 1 disables the filter).
        replay_iters: extra clone steps on the replay memory per round (DisGUIDE: 3).
        replay_size: capacity of the replay memory (DisGUIDE: 1e6), oldest pairs replaced first.
        hard_replay: replay the worst-fitted pairs instead of uniform ones.
        diversity_weight: lambda_div (DisGUIDE: 0.2 on CIFAR-10, 0.04 on CIFAR-100).
        generator_lr: Adam rate of the generators (DisGUIDE: 1e-4).
        lr: SGD rate of the clones (DisGUIDE: 0.03), times 0.3 after each of ``lr_milestones`` (fractions of the
            budget, DisGUIDE: 0.4 and 0.8).
        unknown_num_classes: the class count is unknown (hard labels only): grow the head with the labels seen.
        num_classes: clone outputs (the data's class count, or an upper bound with ``unknown_num_classes``).
        mean: the victim's input normalisation mean (the data's; filled by the CLI).
        std: the victim's input normalisation standard deviation.
        **kwargs: see :class:`~lit_methods.base.MethodBase` (momentum, weight_decay of the clones' SGD).
    """

    slug: ClassVar[str] = "cabage"

    def __init__(
        self,
        victim: nn.Module,
        victim_checkpoint: str | None,
        clone: nn.Module,
        victim_output: Literal["label", "probability"] = "label",
        num_clones: int = 2,
        num_generators: int = 3,
        generator: nn.Module | None = None,
        query_budget: int = 20_000_000,
        batch_size: int = 256,
        filter_ratio: float = 4.0,
        replay_iters: int = 3,
        replay_size: int = 1_000_000,
        hard_replay: bool = True,
        diversity_weight: float = 0.2,
        generator_lr: float = 1e-4,
        lr: float = 0.03,
        lr_milestones: Sequence[float] = (0.4, 0.8),
        unknown_num_classes: bool = False,
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = False,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, momentum=momentum, weight_decay=weight_decay, lr_schedule="constant", mean=mean, std=std,
            inputs_normalized=inputs_normalized, **kwargs,
        )
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        for name, value, minimum in (
            ("num_clones", num_clones, 2), ("num_generators", num_generators, 1), ("query_budget", query_budget, 1),
            ("batch_size", batch_size, 1), ("replay_iters", replay_iters, 0), ("replay_size", replay_size, 1),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if not filter_ratio >= 1.0:
            raise ValueError(f"filter_ratio must be >= 1 (1: no filter), got {filter_ratio}")
        if diversity_weight < 0 or not generator_lr > 0:
            raise ValueError(f"diversity_weight must be >= 0 and generator_lr > 0, got {diversity_weight}, {generator_lr}")
        if any(not 0.0 < m < 1.0 for m in lr_milestones):
            raise ValueError(f"lr_milestones are fractions of the budget in (0, 1), got {list(lr_milestones)}")
        if unknown_num_classes and victim_output != "label":
            raise ValueError("unknown_num_classes needs victim_output='label': probabilities reveal the class count")
        if num_classes is None:
            num_classes = getattr(clone, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (or the clone's num_classes), got {num_classes!r}")
        self.num_classes = num_classes
        self.victim_api = self._load_victim(victim, victim_checkpoint, victim_output, mean, std)
        self.clones = nn.ModuleList()
        for _ in range(num_clones):
            member = copy.deepcopy(clone)
            _reinitialise(member)
            self.clones.append(member)
        if generator is None:
            if in_channels is None or image_size is None:
                raise ValueError("without a generator, give in_channels and image_size (the CLI fills them)")
            size = image_size if isinstance(image_size, int) else image_size[0]
            generator = ImageGenerator(in_channels=in_channels, image_size=size)
        self.generators = nn.ModuleList()
        for _ in range(num_generators):
            member = copy.deepcopy(generator)
            _reinitialise(member)
            self.generators.append(member)
        self.automatic_optimization = False
        self.query_budget = query_budget
        self.batch_size = batch_size
        self.filter_ratio = filter_ratio
        self.replay_iters = replay_iters
        self.replay_size = replay_size
        self.hard_replay = hard_replay
        self.diversity_weight = diversity_weight
        self.generator_lr = generator_lr
        self.lr_milestones = tuple(lr_milestones)
        self.unknown_num_classes = unknown_num_classes
        self.register_buffer("queries", torch.zeros((), dtype=torch.long))
        self.register_buffer("label_counts", torch.zeros(num_classes, dtype=torch.long))
        # clone output j stands for victim label seen_labels[j] (the identity when the class count is known)
        seen = torch.full((num_classes,), -1, dtype=torch.long) if unknown_num_classes else torch.arange(num_classes)
        self.register_buffer("seen_labels", seen)
        self.replay_images: Tensor | None = None
        self.replay_targets: Tensor | None = None
        self.replay_filled = 0
        self.replay_position = 0

    # -- the victim --------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_victim(
        victim: nn.Module, checkpoint: str | None, output: str, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> BlackBoxVictim:
        victim = copy.deepcopy(victim)
        if checkpoint is None:
            return BlackBoxVictim(victim, output, mean, std)
        try:
            load_pretrained_weights(victim, checkpoint, {"backbone.": ""}, source_name=f"victim_checkpoint {checkpoint!r}")
        except (ValueError, RuntimeError, OSError) as error:
            raise type(error)(f"the victim checkpoint {checkpoint!r} does not load into {type(victim).__name__}: {error}") from error
        except Exception as error:  # a file torch cannot read at all
            raise ValueError(f"the victim checkpoint {checkpoint!r} does not load: {error}") from error
        return BlackBoxVictim(victim, output, mean, std)

    @property
    def num_seen(self) -> int:
        """Victim labels seen so far (all classes when the class count is known)."""
        return int((self.seen_labels >= 0).sum())

    def on_fit_start(self) -> None:
        self.victim_api.to(self.device)  # not a submodule: Lightning does not move it

    def on_validation_start(self) -> None:
        self.victim_api.to(self.device)

    def on_test_start(self) -> None:
        self.victim_api.to(self.device)

    # -- clones ------------------------------------------------------------------------------------------------------
    def clone_logits(self, pixels: Tensor) -> Tensor:
        """``(E, N, K)`` logits of every clone on [0, 1] ``pixels``, restricted to the head's active outputs."""
        x = self.normalize_inputs(pixels)
        logits = torch.stack([clone(x) for clone in self.clones])
        return logits[..., : self.num_seen]

    def forward(self, pixels: Tensor) -> Tensor:
        """The clone ensemble's soft vote (probabilities over the victim's labels, ``(N, num_classes)``)."""
        probs = self.clone_logits(pixels).softmax(dim=-1).mean(dim=0)
        out = probs.new_zeros(len(pixels), self.num_classes)
        active = self.seen_labels[: self.num_seen]
        out[:, active] = probs
        return out

    def _record_labels(self, labels: Tensor) -> Tensor:
        """Count the victim's labels and, with an unknown class count, grow the head with the new ones; returns the
        clone outputs that stand for ``labels``."""
        if int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"the victim answered label {int(labels.max())}, but the clones have num_classes={self.num_classes} "
                "outputs: raise num_classes (with unknown_num_classes, an upper bound)"
            )
        self.label_counts += torch.bincount(labels, minlength=self.num_classes)
        if not self.unknown_num_classes:
            return labels
        for label in labels.unique().tolist():  # in label order: new labels of one round take the next outputs
            if not bool((self.seen_labels == label).any()):
                self.seen_labels[self.num_seen] = label
        output_of = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        output_of[self.seen_labels[: self.num_seen]] = torch.arange(self.num_seen, device=labels.device)
        return output_of[labels]

    def clone_loss(self, pixels: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Sum over clones of the loss to the victim's answers (per sample with ``reduction="none"``)."""
        logits = self.clone_logits(pixels)
        if targets.dtype == torch.long:
            losses = torch.stack([F.cross_entropy(lg, targets, reduction="none") for lg in logits])
        else:  # DisGUIDE's soft-label loss: L1 between the raw clone logits and the victim's centred log-probabilities
            log_victim = targets.clamp_min(1e-8).log()
            log_victim = log_victim - log_victim.mean(dim=1, keepdim=True)
            losses = (logits - log_victim).abs().mean(dim=-1)
        per_sample = losses.sum(dim=0)
        return per_sample if reduction == "none" else per_sample.mean()

    # -- optimisation ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        clones = torch.optim.SGD(
            self.clones.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        generators = torch.optim.Adam(self.generators.parameters(), lr=self.generator_lr)
        return [clones, generators]

    def _sample(self, count: int) -> Tensor:
        """``count`` images from the generator ensemble (equal shares), the generators in train mode (batch statistics;
        DisGUIDE queries with its generator in eval mode, which on the digits check lowered the 3-seed agreement of
        both CaBaGe and DisGUIDE-lite, 0.30 -> 0.24 and 0.26 -> 0.16, so it is not done here)."""
        per_generator = -(-count // len(self.generators))
        z = torch.randn(per_generator * len(self.generators), self.generators[0].latent_dim, device=self.device)
        images = torch.cat([g(chunk) for g, chunk in zip(self.generators, z.split(per_generator))])
        return images[:count]

    def generator_loss(self, images: Tensor) -> Tensor:
        """DisGUIDE's generator objective: minus the clones' disagreement plus the weighted negative entropy of the
        batch-mean prediction."""
        probs = self.clone_logits(images).softmax(dim=-1)
        disagreement = probs.std(dim=0).mean()
        mean_probs = probs.mean(dim=0).mean(dim=0)
        return -disagreement + self.diversity_weight * (mean_probs * mean_probs.clamp_min(1e-8).log()).sum()

    def _clone_lr(self) -> float:
        spent = float(self.queries) / self.query_budget
        return self.lr * 0.3 ** sum(spent >= m for m in self.lr_milestones)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        remaining = self.query_budget - int(self.queries)
        if remaining <= 0:
            self.trainer.should_stop = True
            return None
        clone_opt, generator_opt = self.optimizers()
        for group in clone_opt.param_groups:
            group["lr"] = self._clone_lr()
        count = min(self.batch_size, remaining)
        # 1. generators (only after two labels are known: disagreement over one output is 0)
        if self.num_seen >= 2:
            generator_opt.zero_grad()
            self.manual_backward(self.generator_loss(self._sample(self.batch_size)))
            generator_opt.optimizer.step()  # not a Lightning step: global_step counts query rounds
        # 2. filter candidates, query the victim
        with torch.no_grad():
            candidates = self._sample(max(count, math.ceil(self.filter_ratio * count)))
            if len(candidates) > count and self.num_seen >= 2:
                probs = self.clone_logits(candidates).softmax(dim=-1)
                chosen = select_balanced_hard(probs.std(dim=0).mean(dim=-1), probs.mean(dim=0), count)
                candidates = candidates[chosen]
            queried = candidates[:count].detach()
        answers = self.victim_api.query(queried)
        self.queries += len(queried)
        targets = answers if answers.is_floating_point() else self._record_labels(answers)
        if answers.is_floating_point():
            self.label_counts += torch.bincount(answers.argmax(dim=1), minlength=self.num_classes)
        self._remember(queried, targets)
        # 3. clones: the fresh pairs, then replayed ones; the last step is the round's Lightning step
        batches = [(queried, targets)] + [self._replay_batch() for _ in range(self.replay_iters)]
        loss = None
        for i, (x, y) in enumerate(batches):
            clone_opt.zero_grad()
            loss = self.clone_loss(x, y)
            self.manual_backward(loss)
            if i == len(batches) - 1:
                clone_opt.step()
            else:
                clone_opt.optimizer.step()
        self.log("train/clone_loss", loss.detach(), prog_bar=True)
        self.log("train/queries", self.queries.float())
        self.log("train/query_label_entropy", self.query_label_entropy())
        if int(self.queries) >= self.query_budget:
            self.trainer.should_stop = True
        return loss.detach()

    def query_label_entropy(self) -> float:
        """Entropy (nats) of the victim-label histogram of every queried image."""
        p = self.label_counts.double() / self.label_counts.sum().clamp_min(1)
        return float(-(p * p.clamp_min(1e-12).log()).sum())

    # -- replay memory -----------------------------------------------------------------------------------------------
    def _remember(self, images: Tensor, targets: Tensor) -> None:
        images, targets = images.detach().cpu(), targets.detach().cpu()
        if self.replay_images is None:
            self.replay_images = torch.empty(self.replay_size, *images.shape[1:])
            self.replay_targets = torch.empty(self.replay_size, *targets.shape[1:], dtype=targets.dtype)
        for image_block, target_block in zip(images.split(self.replay_size), targets.split(self.replay_size)):
            positions = (self.replay_position + torch.arange(len(image_block))) % self.replay_size
            self.replay_images[positions] = image_block
            self.replay_targets[positions] = target_block
            self.replay_position = int((self.replay_position + len(image_block)) % self.replay_size)
            self.replay_filled = min(self.replay_size, self.replay_filled + len(image_block))

    def _replay_batch(self) -> tuple[Tensor, Tensor]:
        pool = math.ceil(self.filter_ratio * self.batch_size) if self.hard_replay else self.batch_size
        index = torch.randint(self.replay_filled, (pool,))
        images, targets = self.replay_images[index].to(self.device), self.replay_targets[index].to(self.device)
        if self.hard_replay and pool > self.batch_size:
            with torch.no_grad():
                losses = self.clone_loss(images, targets, reduction="none")
            # priority on hard pairs, with a uniform floor: drawn without replacement with weights loss + mean loss
            weights = (losses + losses.mean()).clamp_min(1e-12).cpu()
            keep = torch.multinomial(weights, self.batch_size, replacement=False).to(self.device)
            images, targets = images[keep], targets[keep]
        return images, targets

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        n = self.replay_filled
        checkpoint["cabage_replay"] = {
            "images": None if self.replay_images is None else self.replay_images[:n].clone(),
            "targets": None if self.replay_targets is None else self.replay_targets[:n].clone(),
            "filled": n,
            "position": self.replay_position,
            "victim_forward_passes": self.victim_api.forward_passes,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("cabage_replay")
        if state is None:
            return
        self.replay_filled, self.replay_position = state["filled"], state["position"]
        self.victim_api.forward_passes = state["victim_forward_passes"]
        if state["images"] is not None:
            self.replay_images = torch.empty(self.replay_size, *state["images"].shape[1:])
            self.replay_targets = torch.empty(self.replay_size, *state["targets"].shape[1:], dtype=state["targets"].dtype)
            self.replay_images[: self.replay_filled] = state["images"]
            self.replay_targets[: self.replay_filled] = state["targets"]

    # -- measuring the clones ----------------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        if self.num_seen == 0:
            return
        predicted = self(pixels).argmax(dim=1)
        victim = self.victim_api.evaluate(pixels)
        victim_labels = victim if victim.dtype == torch.long else victim.argmax(dim=1)
        self.log("val/clone_acc", (predicted == targets).float().mean(), on_epoch=True, prog_bar=True)
        self.log("val/agreement", (predicted == victim_labels).float().mean(), on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)


def _reinitialise(module: nn.Module) -> None:
    for child in module.modules():
        if child is not module and hasattr(child, "reset_parameters"):
            child.reset_parameters()
