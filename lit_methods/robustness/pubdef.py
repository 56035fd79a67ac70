"""PubDef: training against transfer attacks from public source models (Sitawarin, Chang, Huang, Altoyan, Wagner,
"PubDef: Defending Against Transfer Attacks From Public Models", arXiv:2310.17645, https://arxiv.org/abs/2310.17645).

As the official code's "mix" mode (``wagner-group/pubdef``): transfer adversarial examples of the whole training set
are generated once per source model and copy (``torchattacks``, through
:func:`~lit_methods.robustness.attacks.make_attack`), cached on disk with their settings and reused every epoch; each
training item is paired with one transfer example of itself from a uniformly drawn source and copy, and the loss is
``w_clean * CE(clean) + w_transfer * CE(transfer)`` with the weights normalised to sum to 1 (the paper's 0.5 / 0.5).
The per-stream dropout, worst-k and EMA-reweighted variants of the official code are not included. Transfer examples
are those of the un-augmented training images (train without crop/flip augmentation to keep both streams alike) and
are stored as ``uint8`` pixels (rounded to 1/255 inside the eps-ball).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier, read_checkpoint
from lit_methods.datamodules import InMemoryVisionDataModule, Normalize
from lit_methods.datamodules.batch import as_batch
from lit_methods.robustness.attacks import check_attack_arguments, check_eps, make_attack, write_robust_accuracy_table

__all__ = ["PubDef", "generate_transfer_examples", "load_source_weights"]


def load_source_weights(model: nn.Module, path: str) -> None:
    """Load a source model's weights: a plain ``state_dict`` or the ``backbone.*`` entries of a Lightning checkpoint of
    an :class:`~lit_methods.ImageClassifier`. Raises ``ValueError`` naming ``path`` when it does not load."""
    try:
        state = read_checkpoint(path)
        state = state.get("state_dict", state)
        if any(key.startswith("backbone.") for key in state):
            state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
        model.load_state_dict(state, strict=True)
    except Exception as error:  # any reason (missing file, wrong format, other architecture) is the same user error
        raise ValueError(f"source model checkpoint {path!r} does not load into {type(model).__name__}: {error}") from None


@torch.no_grad()
def generate_transfer_examples(
    sources: Sequence[nn.Module],
    pixels: Tensor,
    targets: Tensor,
    attack: str,
    eps: float,
    alpha: float,
    steps: int,
    copies: int,
    seed: int,
    num_classes: int,
    batch_size: int = 256,
) -> Tensor:
    """``uint8`` transfer examples ``(sources, copies, N, C, H, W)`` of [0, 1] ``pixels``, crafted with ``attack`` on
    each source (which maps [0, 1] pixels to logits); copies differ by their random starts. The global RNG is
    untouched (a forked one seeded with ``seed`` draws the starts). Stored values are rounded to 1/255 and kept in the
    eps-ball of the clean image (rounded down to whole 1/255 steps)."""
    examples = torch.empty(len(sources), copies, *pixels.shape, dtype=torch.uint8)
    radius = float(int(eps * 255 + 1e-6))  # whole 1/255 steps inside the eps-ball around the (uint8) clean image
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s, source in enumerate(sources):
            crafter = make_attack(attack, source, eps, alpha, steps, num_classes, seed=seed)
            for copy in range(copies):
                for start in range(0, len(targets), batch_size):
                    with torch.inference_mode(False), torch.enable_grad():
                        adversarial = crafter(pixels[start : start + batch_size].clone(),
                                              targets[start : start + batch_size].clone())  # fmt: skip
                    clean = (pixels[start : start + batch_size] * 255).round()
                    stored = (adversarial * 255).round().clamp(clean - radius, clean + radius).clamp(0, 255)
                    examples[s, copy, start : start + batch_size] = stored.to(torch.uint8).cpu()
    return examples


class PubDef(ImageClassifier):
    """Training against cached transfer attacks from public source models (arXiv:2310.17645): see the module doc.

    Works on [0, 1] pixels (``normalize: false`` data; the model and the sources normalize with the data's ``mean``
    and ``std``). At ``setup`` the transfer examples of the training set are loaded from ``cache_path`` or, if that
    file does not exist, generated and saved there with their settings (a file with other settings is an error, so a
    resumed run uses exactly the examples of the first); generation runs at ``on_fit_start`` on the model's device. The
    datamodule (an in-memory one) is asked for each training
    item's index, which selects its transfer examples. Testing attacks the model from each of ``attacker_models``
    (held-out sources) with each of ``eval_attacks`` and logs ``test/transfer_acc/<attacker>/<attack>`` and their
    minimum ``test/worst_transfer_acc``; the table ``transfer_accuracy.md`` / ``.csv`` is written next to the logs.

    Args:
        backbone: the defended classifier of normalized images.
        source_models: the public source models (classifiers of normalized images), e.g. by ``class_path``.
        source_checkpoints: one weights file per source model (:func:`load_source_weights`); ``None`` keeps the
            modules' weights as given (from Python: trained models; from a config: random weights, for smoke tests).
        attacker_models: held-out source models of the test-time transfer attacks.
        attacker_checkpoints: their weights files (``None``: as given).
        attack: ``torchattacks`` attack generating the training examples (official: PGD).
        eps: L-infinity radius in [0, 1] pixels (paper: 8/255 on CIFAR).
        steps: attack steps (official training split: 10).
        alpha: step size (official: 1.25 * eps / steps).
        copies: transfer examples per training image and source (official: 4).
        clean_weight: weight of the clean cross-entropy (normalised with ``transfer_weight`` to sum to 1).
        transfer_weight: weight of the transfer cross-entropy.
        cache_path: the cache file.
        cache_seed: seed of the attacks' random starts.
        eval_attacks: ``torchattacks`` attacks of the test-time transfer evaluation.
        eval_steps: their steps (their step size is ``eps / 4``).
        **kwargs: the other arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "pubdef"
    requires_pixel_inputs = True

    def __init__(
        self,
        backbone: nn.Module,
        source_models: Sequence[nn.Module],
        source_checkpoints: Sequence[str] | None = None,
        attacker_models: Sequence[nn.Module] = (),
        attacker_checkpoints: Sequence[str] | None = None,
        attack: str = "PGD",
        eps: float = 8 / 255,
        steps: int = 10,
        alpha: float = 1.25 * (8 / 255) / 10,
        copies: int = 4,
        clean_weight: float = 1.0,
        transfer_weight: float = 1.0,
        cache_path: str = "pubdef_transfer_examples.pt",
        cache_seed: int = 0,
        eval_attacks: Sequence[str] = ("PGD", "MIFGSM"),
        eval_steps: int = 10,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        inputs_normalized: bool = False,
        **kwargs: Any,
    ) -> None:
        check_eps(eps)
        check_attack_arguments(eps, alpha, steps)
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be an integer >= 1, got {copies!r}")
        if clean_weight < 0 or transfer_weight < 0 or clean_weight + transfer_weight <= 0:
            raise ValueError(f"weights must be >= 0 and not both 0, got ({clean_weight}, {transfer_weight})")
        if not source_models:
            raise ValueError("PubDef needs at least one source model")
        for name in (attack, *eval_attacks):  # a name torchattacks does not have fails here, not after training
            make_attack(name, nn.Linear(1, 1), eps)
        super().__init__(backbone, mean=mean, std=std, inputs_normalized=inputs_normalized, **kwargs)
        self.sources = nn.ModuleList(self._frozen(source_models, source_checkpoints, "source_checkpoints"))
        self.attackers = nn.ModuleList(self._frozen(attacker_models, attacker_checkpoints, "attacker_checkpoints"))
        self.source_checkpoints = list(source_checkpoints) if source_checkpoints is not None else None
        self.attack, self.eps, self.steps, self.alpha, self.copies = attack, eps, steps, alpha, copies
        total = clean_weight + transfer_weight
        self.clean_weight, self.transfer_weight = clean_weight / total, transfer_weight / total
        self.cache_path, self.cache_seed = Path(cache_path), cache_seed
        self.eval_attacks, self.eval_steps = list(eval_attacks), eval_steps
        self.transfer_examples: Tensor | None = None
        self._cache_settings: dict[str, Any] = {}
        self._transfer_correct: dict[tuple[int, str], int] = {}
        self._transfer_count = 0

    def _frozen(self, models: Sequence[nn.Module], paths: Sequence[str] | None, what: str) -> list[nn.Module]:
        if paths is not None and len(paths) != len(models):
            raise ValueError(f"{what} lists {len(paths)} files for {len(models)} models")
        frozen = []
        for index, model in enumerate(models):
            if paths is not None:
                load_source_weights(model, paths[index])
            pixel_model = nn.Sequential(Normalize(self.normalize.mean.flatten().tolist(),
                                                  self.normalize.std.flatten().tolist()), model)  # fmt: skip
            frozen.append(pixel_model.eval().requires_grad_(False))
        return frozen

    def train(self, mode: bool = True) -> PubDef:
        super().train(mode)
        self.sources.eval()  # sources and attackers stay frozen and in evaluation mode
        self.attackers.eval()
        return self

    # -- the transfer examples -----------------------------------------------------------------------------------
    def cache_settings(self, num_images: int, image_shape: tuple[int, ...]) -> dict[str, Any]:
        return {
            "attack": self.attack, "eps": self.eps, "alpha": self.alpha, "steps": self.steps, "copies": self.copies,
            "seed": self.cache_seed, "sources": len(self.sources), "source_checkpoints": self.source_checkpoints,
            "num_images": num_images, "image_shape": list(image_shape),
        }  # fmt: skip

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, InMemoryVisionDataModule):
            raise ValueError(f"PubDef needs an in-memory datamodule (its item indices), got {type(datamodule).__name__}")
        datamodule.setup("fit")
        images, labels = datamodule.train_images, datamodule.train_labels
        self._cache_settings = self.cache_settings(len(labels), tuple(images.shape[1:]))
        strategy = self.trainer.strategy
        strategy.barrier()  # every rank looks for the cache before any rank writes it
        exists = self.cache_path.exists()
        strategy.barrier()
        if exists:
            cached = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            if cached["settings"] != self._cache_settings:
                raise ValueError(
                    f"the transfer-example cache {str(self.cache_path)!r} was made with {cached['settings']}, not "
                    f"{self._cache_settings}: delete it or choose another cache_path"
                )
            self.transfer_examples = cached["examples"]
        indices = torch.arange(len(labels))
        datamodule.train_dataloader = partial(  # type: ignore[method-assign]
            datamodule.loader_of, images, labels, train=True, extras={"index": indices}
        )

    def on_fit_start(self) -> None:
        """Generate (on the model's device, identically on every rank) and save the cache when it was missing."""
        if self.transfer_examples is not None:
            return
        datamodule = self.trainer.datamodule
        pixels = datamodule.train_images.to(self.device).float().div(255)
        self.transfer_examples = generate_transfer_examples(
            list(self.sources), pixels, datamodule.train_labels.to(self.device), self.attack, self.eps, self.alpha,
            self.steps, self.copies, self.cache_seed, self.num_classes,
        )  # fmt: skip
        if self.trainer.is_global_zero:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"settings": self._cache_settings, "examples": self.transfer_examples}, self.cache_path)
        self.trainer.strategy.barrier()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        if "index" not in batch or self.transfer_examples is None:
            raise RuntimeError("PubDef training batches need the items' index: train through Trainer.fit")
        clean, targets, index = batch["inputs"], batch["targets"], batch["index"].cpu()
        sources, copies = self.transfer_examples.shape[:2]
        source = torch.randint(sources, (len(index),))
        copy = torch.randint(copies, (len(index),))
        transfer = self.transfer_examples[source, copy, index].to(clean.device).float().div(255)
        logits = self(torch.cat([clean, transfer]))
        clean_logits, transfer_logits = logits[: len(index)], logits[len(index) :]
        loss = self.mixed_loss(clean_logits, transfer_logits, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._update_metrics("train", clean_logits, targets)
        return loss

    def mixed_loss(self, clean_logits: Tensor, transfer_logits: Tensor, targets: Tensor) -> Tensor:
        """``w_clean * CE(clean) + w_transfer * CE(transfer)`` (weights summing to 1)."""
        return self.clean_weight * self.compute_loss(clean_logits, targets) + self.transfer_weight * self.compute_loss(
            transfer_logits, targets
        )

    # -- transfer evaluation -------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._transfer_correct = {(a, name): 0 for a in range(len(self.attackers)) for name in self.eval_attacks}
        self._transfer_count = 0

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().test_step(batch, batch_idx)
        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        for (index, name) in self._transfer_correct:
            attacker = self.attackers[index]
            crafter = make_attack(name, attacker, self.eps, self.eps / 4, self.eval_steps, self.num_classes)
            with torch.inference_mode(False), torch.enable_grad():
                adversarial = crafter(pixels.clone(), targets.clone()).detach()
            with torch.no_grad():
                self._transfer_correct[(index, name)] += int((self(adversarial).argmax(1) == targets).sum())
        self._transfer_count += len(targets)
        return loss

    def on_test_epoch_end(self) -> None:
        rows = []
        reduce = self.trainer.strategy.reduce
        count = float(reduce(torch.tensor(float(self._transfer_count), device=self.device), reduce_op="sum"))
        for (index, name), correct in self._transfer_correct.items():
            accuracy = float(reduce(torch.tensor(float(correct), device=self.device), reduce_op="sum")) / max(1, count)
            self.log(f"test/transfer_acc/{index}/{name}", accuracy)
            rows.append({"attacker": index, "attack": name, "eps": self.eps, "transfer_acc": accuracy})
        if rows:
            self.log("test/worst_transfer_acc", min(row["transfer_acc"] for row in rows))
            if self.trainer.is_global_zero:
                directory = self.trainer.log_dir or self.trainer.default_root_dir
                write_robust_accuracy_table(rows, Path(directory), "transfer_accuracy")
