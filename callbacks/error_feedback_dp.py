"""Differentially private training by per-sample clipping, with DiceSGD's error feedback or as plain DP-SGD.

DiceSGD: Zhang, Bu, Wu, Hong, "Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach",
ICLR 2024, https://arxiv.org/abs/2311.14632. The baseline (``error_feedback=False``) is DP-SGD with gradient
clipping (DPSGD-GC): Abadi et al., "Deep Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lit_methods.datamodules.batch import as_batch
from lit_methods.privacy import (
    DICESGD_ACCOUNTANTS,
    BookKeeping,
    calibrate_by_bisection,
    calibrate_noise_multiplier,
    clip_factors,
    dicesgd_step_entry,
    rdp_epsilon,
    require_opacus,
    steps_within_budget,
    unsupported_trainable_layers,
    vmap_per_sample_gradients,
)

__all__ = ["ErrorFeedbackDP"]

_PER_SAMPLE_METHODS = ("auto", "book_keeping", "vmap")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fresh_noise_seed() -> int:
    """63 bits of OS entropy (``secrets``) drawn on rank 0 and broadcast, so every rank adds the same noise."""
    seed = torch.tensor([secrets.randbits(63)], dtype=torch.int64)
    if _distributed():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        seed = seed.to(backend_device)
        dist.broadcast(seed, src=0)
    return int(seed.item())


def _dataset_size(loader: Any) -> int:
    """The number of training samples ``N`` behind a training loader (a ``DataLoader``'s dataset, or the
    in-memory loader's sampler)."""
    if hasattr(loader, "dataset"):
        return len(loader.dataset)
    if hasattr(getattr(loader, "sampler", None), "num_samples"):
        return int(loader.sampler.num_samples)
    raise TypeError(
        f"ErrorFeedbackDP needs the training set size for the sample rate, but the training loader "
        f"{type(loader).__name__} has neither a dataset nor a sampler with num_samples"
    )


class ErrorFeedbackDP(Callback):
    """DiceSGD (per-sample clipping + clipped error feedback + Gaussian noise), or DP-SGD with gradient clipping.

    Zhang et al., "Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach", ICLR 2024,
    https://arxiv.org/abs/2311.14632. Each optimizer step, with the batch's per-sample gradients ``g_i`` (over all
    ranks; ``B`` the expected global batch size, see Sampling), ``C1 = clip_norm``, ``C2 = feedback_clip_norm``,
    ``sigma = noise_multiplier`` and the error buffer ``e`` (zero at the start; norms are global over all trainable
    parameters)::

        c = (1/B) sum_i clip(g_i, C1)                        f = clip(e, C2)             v = c + f
        p.grad <- v + (sigma C1 / B) N(0, I) + (sigma C2 / B) N(0, I)   (the second term once e has been written)
        e <- e + (1/B) sum_i g_i - v

    and the model's optimizer steps on ``p.grad`` as usual. With ``error_feedback=False``: ``f = 0``, no second
    noise term and no buffer, i.e. DPSGD-GC.

    Contract with the LightningModule (met by :class:`lit_methods.ImageClassifier` and its subclasses): the
    training batch is ``(inputs, targets, ...)``; ``module(inputs)`` is the forward pass and
    ``module.compute_loss(outputs, targets)`` the *mean* loss over the batch; ``training_step`` returns that loss
    of that batch. In ``on_before_optimizer_step`` every trainable ``p.grad`` is overwritten with the privatized
    direction. BatchNorm mixes samples and is refused at setup: build the net with ``norm="groupnorm"``.
    Per-sample gradients come from one of two methods (``per_sample_method``):

    - ``"book_keeping"`` (Bu et al., "Differentially Private Optimization on Large Model at Small Cost",
      https://arxiv.org/abs/2210.00038, with ghost norms of Li et al., https://arxiv.org/abs/2110.05679): Lightning's
      ordinary backward is the only backward. Hooks (:class:`lit_methods.privacy.BookKeeping`) record each
      layer's input and output gradient; per-sample norms are computed from them (ghost norms where cheaper), and
      the clipped sum is one matmul or weighted sum per layer. In one process the backward skips the batch
      gradients of the parameters (they would be discarded) and the raw mean that DiceSGD's buffer needs comes
      from the same per-sample terms; other callbacks see no ``p.grad`` before this callback's
      ``on_before_optimizer_step``. Under DDP, whose reducer needs them, the ordinary gradients are computed and
      the raw mean is DDP's averaged ``p.grad`` (the global raw mean when every rank's batch has the same size,
      which is checked; unequal sizes raise). Supports trainable ``nn.Linear``,
      ``nn.Conv2d`` (``groups=1``, zero padding), ``nn.GroupNorm`` and ``nn.LayerNorm`` layers, each run once per
      training step; not under ``precision="16-mixed"`` (its loss scaling scales the recorded gradients).
    - ``"vmap"``: ``torch.func.vmap(grad(...))`` of ``compute_loss`` on one-sample batches (``functional_call``
      over the trainable parameters, buffers as they are) of the batch that ``training_step`` saw (captured in
      ``on_train_batch_start``, after ``on_after_batch_transfer``); randomness (dropout) is drawn independently
      per sample. Any layer type; costs Lightning's ordinary backward (whose gradient is discarded) plus a
      per-sample pass that materializes every per-sample gradient.
    - ``"auto"`` (default): book-keeping when the model and trainer meet its conditions, else vmap (chosen at
      setup; :attr:`active_per_sample_method` says which).

    Both give the same update up to float rounding (tested). With dropout, book-keeping clips the gradients of
    the masks drawn in the ordinary forward.

    Sampling: with ``B`` the loader's batch size times the number of ranks and ``N`` the training set size, the
    sample rate is ``q = B / N`` and every sum is divided by this *expected* batch size ``B``, never by the realised
    one, so the sensitivity ``C1 / B`` and the noise std ``sigma C1 / B`` are the same on every step, a short last
    batch included (``q = B / N`` is at least ``1 / num_batches``). The RDP accountant assumes Poisson sampling at
    rate ``q`` (each sample in each batch independently); shuffled fixed-size batches are the customary
    approximation of it, not a proof. For the exact assumption, train on opacus' Poisson loader
    (``opacus.data_loader.DPDataLoader.from_data_loader(loader)``): its ``sample_rate`` is then used as ``q``.

    Accounting (``accountant``, DiceSGD only; DPSGD-GC is always opacus' RDP accountant of the sub-sampled Gaussian
    mechanism, ``T`` steps of ``(sigma, q)``):

    - ``"feedback_sensitivity_bound"`` (default): a bound proved in
      :func:`lit_methods.privacy.feedback_noise_multiplier` for any data and any ``C1, C2``: conditioned on the
      sampling (no amplification), the first step is a Gaussian mechanism of multiplier ``sigma`` and each later
      one a Gaussian mechanism of sensitivity ``C1 / B + 2 C2`` (the fed-back ``clip(e, C2)`` depends on a
      sample's unclipped gradients ever after it was drawn) and noise std ``sigma sqrt(C1^2 + C2^2) / B``. It
      guarantees ``(epsilon, delta)``-DP of the released iterates, but is loose: at equal epsilon it needs far more
      noise than DPSGD-GC. The paper's privacy theorem (Section 3, for ``C2 >= C1``) could not be recovered
      exactly, so it is not implemented.
    - ``"official_code_log_epochs_heuristic"``: the official code's accounting, each step counted as
      ``accountant_steps_per_step`` DP-SGD steps (default ``max(1, floor(ln E))`` for ``E`` planned epochs). It does
      not depend on ``C2`` nor on the unclipped history: a heuristic, *not* a privacy guarantee. The official code
      (github.com/564612540/DiceSGD) changed it over time: ``floor(ln E)`` (ours) in ``DiceSGD/optimizers.py`` until
      commit 246fcd2 removed that file; at 246fcd2 (the newest) its GLUE and regression scripts count
      ``floor(ln E) + 1`` (set ``accountant_steps_per_step`` to follow them), its CIFAR script no extra steps, and
      all of them draw one noise of std ``sigma C1 sqrt(1 + 2 C2 / C1)`` (its ``C2`` is a ratio to ``C1``) where we
      draw two, of std ``sigma C1`` and ``sigma C2``.

    ``dp/epsilon_dpsgd`` reports the DPSGD-GC bound of the same steps for comparison (not a guarantee for DiceSGD).

    Noise: the generator is a ``torch.Generator`` (mt19937 on CPU, Philox on CUDA) seeded, by default, with 63 bits
    of OS entropy (``secrets``) drawn on rank 0 and broadcast, so that the noise cannot be regenerated from the
    config and DDP ranks add the same noise. What this does not promise: the generator is not a cryptographically
    secure PRNG (opacus' ``secure_mode=True`` draws from torchcsprng's CSPRNG), and the Gaussian samples are plain
    floating-point samples, not hardened against floating-point attacks (opacus' secure mode sums ``2n = 4`` draws,
    Holohan and Braghin, https://arxiv.org/abs/2107.10138); the checkpoint holds the generator state, so keep it
    as private as the data. An explicit ``seed`` makes the noise reproducible by anyone who knows it and voids the
    guarantee: it is meant for tests, and warns.

    ``target_epsilon`` calibrates the noise with opacus' ``get_noise_multiplier`` for the planned number of steps
    (``trainer.estimated_stepping_batches``). Epsilon is logged every epoch (``dp/epsilon``) and checkpointed with
    the accountant's history, the error buffer and the noise generator, so a resumed run continues exactly and
    never resets the spent budget (nor re-calibrates the noise). With ``target_epsilon``, training stops
    (``trainer.should_stop``) after the last step whose epsilon stays within the budget; no step ever exceeds it
    (a step that would, e.g. forced by ``min_epochs``, raises).

    With pruning (:class:`~lit_methods.callbacks.ActivatingWhilePruning`, or any callback with a ``masks`` dict of
    0/1 tensors keyed by parameter name, listed after this one): the masks are read at each batch start into
    :attr:`weight_masks`; per-sample norms, clipped and raw sums cover the live (unmasked) coordinates only, so a
    live gradient is clipped to ``C1`` itself (book-keeping materializes masked layers' per-sample gradients
    instead of using ghost norms), the error buffer is kept zero on pruned coordinates, and it is zeroed whole
    when the masks change (a prune and rewind).

    Under DDP each rank clips its own samples; the clipped sums and sample counts (vmap: also the raw sums for the
    buffer; book-keeping takes the raw mean from DDP's averaged gradient) are summed over ranks with one
    all-reduce, and every rank draws the same noise from the callback's generator (same seed and state), so the
    update equals the single-process update on the same global batch.

    Cost (``benchmarks/dp_step.py``, GroupNorm ResNet-20, batch 64, 2-core CPU, quiet run): a book-keeping step takes
    1.40x (DiceSGD) and 1.28x (DPSGD-GC) a non-private step, 0.73x and 0.67x an opacus ``GradSampleModule`` step;
    most of the privatize part is the per-sample convolution weight gradients (see ``benchmarks/README.md``).

    Args:
        clip_norm: per-sample clipping threshold ``C1`` (``> 0``; ``inf`` disables clipping).
        noise_multiplier: ``sigma``; give this or ``target_epsilon``.
        target_epsilon: the privacy budget; the noise is calibrated to spend it over the planned steps.
        delta: the ``delta`` of ``(epsilon, delta)``-DP, in ``(0, 1)``.
        error_feedback: DiceSGD (``True``) or DPSGD-GC (``False``).
        feedback_clip_norm: ``C2 >= C1``, the threshold of the fed-back error (the paper's condition, checked);
            ``clip_norm`` when omitted (the paper's and official code's default ``C1 = C2``).
        accountant: DiceSGD's accounting, ``"feedback_sensitivity_bound"`` or
            ``"official_code_log_epochs_heuristic"`` (see above); ignored by DPSGD-GC.
        accountant_steps_per_step: the heuristic accountant's count of DP-SGD steps per optimizer step (``>= 1``;
            ``max(1, floor(ln E))`` when omitted); only with ``accountant="official_code_log_epochs_heuristic"``.
        seed: seed of the noise generator, for tests only: it voids the privacy guarantee and warns. ``None``
            (default): a fresh seed from OS entropy (see above).
        chunk_size: samples per ``vmap`` chunk (bounds the memory of the per-sample gradients); all at once if None.
            Applies to the vmap method only.
        per_sample_method: ``"auto"``, ``"book_keeping"`` (raises at setup when the model has a layer it cannot
            handle, naming it) or ``"vmap"``; see above.
    """

    slug: ClassVar[str] = "dicesgd"

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        error_feedback: bool = True,
        feedback_clip_norm: float | None = None,
        accountant: Literal["feedback_sensitivity_bound", "official_code_log_epochs_heuristic"] = (
            "feedback_sensitivity_bound"
        ),
        accountant_steps_per_step: int | None = None,
        seed: int | None = None,
        chunk_size: int | None = None,
        per_sample_method: Literal["auto", "book_keeping", "vmap"] = "auto",
    ) -> None:
        numbers = {"clip_norm": clip_norm, "noise_multiplier": noise_multiplier, "target_epsilon": target_epsilon,
                   "delta": delta, "feedback_clip_norm": feedback_clip_norm}
        for name, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if feedback_clip_norm is not None and not feedback_clip_norm > 0:
            raise ValueError(f"feedback_clip_norm must be > 0, got {feedback_clip_norm}")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon}"
            )
        if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
        infinite_clip = math.isinf(clip_norm) or (feedback_clip_norm is not None and math.isinf(feedback_clip_norm))
        if infinite_clip and noise_multiplier != 0:
            raise ValueError(
                f"an infinite clip norm (clip_norm={clip_norm}, feedback_clip_norm={feedback_clip_norm}) has unbounded "
                f"sensitivity: it needs noise_multiplier=0, got noise_multiplier={noise_multiplier}, "
                f"target_epsilon={target_epsilon}"
            )
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if accountant_steps_per_step is not None and accountant_steps_per_step < 1:
            raise ValueError(f"accountant_steps_per_step must be >= 1, got {accountant_steps_per_step}")
        if accountant not in DICESGD_ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {DICESGD_ACCOUNTANTS}, got {accountant!r}")
        if accountant_steps_per_step is not None and not (
            error_feedback and accountant == "official_code_log_epochs_heuristic"
        ):
            raise ValueError(
                f"accountant_steps_per_step={accountant_steps_per_step} applies to DiceSGD's "
                f"accountant='official_code_log_epochs_heuristic' only (got accountant={accountant!r}, "
                f"error_feedback={error_feedback})"
            )
        if error_feedback and feedback_clip_norm is not None and feedback_clip_norm < clip_norm:
            raise ValueError(
                f"DiceSGD needs feedback_clip_norm >= clip_norm (C2 >= C1, the paper's condition), got "
                f"feedback_clip_norm={feedback_clip_norm} < clip_norm={clip_norm}"
            )
        if seed is not None:
            warnings.warn(
                f"ErrorFeedbackDP(seed={seed}): anyone who knows the seed can regenerate the noise, which voids the "
                "privacy guarantee; set a seed for tests only",
                UserWarning,
                stacklevel=2,
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if per_sample_method not in _PER_SAMPLE_METHODS:
            raise ValueError(f"per_sample_method must be one of {_PER_SAMPLE_METHODS}, got {per_sample_method!r}")
        if per_sample_method == "book_keeping" and chunk_size is not None:
            raise ValueError(
                f"chunk_size={chunk_size} applies to the vmap method, not to per_sample_method='book_keeping'"
            )
        self.clip_norm = float(clip_norm)
        self.feedback_clip_norm = float(feedback_clip_norm if feedback_clip_norm is not None else clip_norm)
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.error_feedback = error_feedback
        self.accountant = accountant
        self.accountant_steps_per_step = accountant_steps_per_step
        self.seed = seed
        self.chunk_size = chunk_size
        self.per_sample_method = per_sample_method
        require_opacus("ErrorFeedbackDP")  # fail at construction when opacus is missing
        # state (checkpointed)
        self.sample_rate: float | None = None
        self.expected_batch_size: int | None = None  # over all ranks; the divisor of every sum
        self.steps = 0
        self.history: list[tuple[float, float, int]] = []  # accountant history, in accountant steps
        self.dpsgd_history: list[tuple[float, float, int]] = []  # the same steps as DPSGD-GC steps
        self.weight_masks: dict[str, Tensor] = {}  # parameter name -> 0/1 mask of live coordinates
        self.error: dict[str, Tensor] = {}
        self._generator_state: Tensor | None = None
        # per-run
        self._generator: torch.Generator | None = None
        self._batch: tuple[Tensor, Tensor] | None = None
        self._steps_allowed: int | None = None
        self.active_per_sample_method: Literal["book_keeping", "vmap"] | None = None  # chosen at setup
        self._book_keeping: BookKeeping | None = None

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise TypeError(
                    f"ErrorFeedbackDP needs per-sample gradients, but layer {name!r} is {type(module).__name__}, "
                    'which mixes samples: build the net with norm="groupnorm" (e.g. ResNet20(norm="groupnorm"))'
                )
        if not callable(getattr(pl_module, "compute_loss", None)):
            raise TypeError(f"ErrorFeedbackDP needs {type(pl_module).__name__}.compute_loss(outputs, targets)")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"ErrorFeedbackDP clips and adds noise per optimizer step, accumulate_grad_batches must be 1, got "
                f"{trainer.accumulate_grad_batches}: use a larger batch instead"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"gradient_clip_val={trainer.gradient_clip_val} would rescale the privatized update: ErrorFeedbackDP "
                "clips per sample (clip_norm); leave gradient_clip_val unset"
            )
        self.active_per_sample_method = self._choose_method(trainer, pl_module)
        if self.active_per_sample_method == "book_keeping":
            self.attach_book_keeping(pl_module, parameter_gradients=trainer.world_size > 1)

    def _choose_method(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Literal["book_keeping", "vmap"]:
        if self.per_sample_method == "vmap":
            return "vmap"
        unsupported = unsupported_trainable_layers(pl_module)
        if unsupported:
            reason = (
                "book-keeping supports trainable Linear, Conv2d (groups=1, zero padding), GroupNorm and LayerNorm "
                f"layers only; unsupported: {', '.join(unsupported)}"
            )
        elif trainer.precision == "16-mixed":
            reason = "precision='16-mixed' scales the loss, and with it the gradients book-keeping records"
        else:
            return "book_keeping"
        if self.per_sample_method == "book_keeping":
            raise TypeError(f"ErrorFeedbackDP(per_sample_method='book_keeping'): {reason}; use 'vmap' or 'auto'")
        return "vmap"

    def attach_book_keeping(self, pl_module: nn.Module, parameter_gradients: bool = False) -> None:
        """Record ``pl_module``'s layer inputs and output gradients for :meth:`privatized_gradients_from_backward`.

        Called at setup when book-keeping is chosen (``parameter_gradients`` only under DDP, whose reducer needs
        them); call it by hand to use the callback outside a Trainer. ``parameter_gradients=False`` spares the
        backward the batch gradients of the parameters (see :class:`~lit_methods.privacy.BookKeeping`).
        """
        self.detach_book_keeping()
        self._book_keeping = BookKeeping(pl_module, parameter_gradients=parameter_gradients)

    def detach_book_keeping(self) -> None:
        """Remove the book-keeping hooks (at teardown)."""
        if self._book_keeping is not None:
            self._book_keeping.remove()
            self._book_keeping = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.detach_book_keeping()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sample_rate is None:  # a fresh run (a resumed one keeps sample rate, noise and step factor)
            self._set_sample_rate(trainer)
            if self.error_feedback and self.accountant == "official_code_log_epochs_heuristic":
                if self.accountant_steps_per_step is None:
                    self.accountant_steps_per_step = self._log_epochs(trainer)
            if self.target_epsilon is not None:
                self.noise_multiplier = self._calibrate(self._planned_steps(trainer))
        if self._generator is None or self._generator_state is not None:  # fresh, or restored from a checkpoint
            self._generator = self._make_generator(pl_module.device)  # (a reused callback keeps drawing fresh noise)
            self._generator_state = None
        if self.target_epsilon is not None:
            self._steps_allowed = self._count_steps_allowed()
            if self._steps_allowed == 0:
                trainer.should_stop = True

    def _set_sample_rate(self, trainer: L.Trainer) -> None:
        """``q`` and the expected batch size: the Poisson loader's rate, else ``B / N`` of fixed-size batches."""
        loader = trainer.train_dataloader
        dataset_size = _dataset_size(loader)
        poisson_rate = getattr(loader, "sample_rate", None)  # opacus' DPDataLoader
        if poisson_rate is not None:
            if trainer.world_size > 1:
                raise ValueError("ErrorFeedbackDP accounts opacus' Poisson DPDataLoader in one process only")
            self.sample_rate = float(poisson_rate)
            self.expected_batch_size = max(1, round(poisson_rate * dataset_size))
            return
        if loader.batch_size is None:
            raise TypeError(
                f"ErrorFeedbackDP needs fixed-size training batches (the loader's batch_size), got batch_size=None "
                f"from {type(loader).__name__}"
            )
        self.expected_batch_size = int(loader.batch_size) * trainer.world_size
        if self.expected_batch_size > dataset_size:
            raise ValueError(
                f"the global batch size {self.expected_batch_size} exceeds the {dataset_size} training samples"
            )
        self.sample_rate = self.expected_batch_size / dataset_size

    def _make_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else _fresh_noise_seed())
        if self._generator_state is not None:
            generator.set_state(self._generator_state)
        return generator

    def _planned_steps(self, trainer: L.Trainer) -> int:
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("set max_epochs or max_steps: the privacy accounting needs the planned number of steps")
        return int(steps)

    def _log_epochs(self, trainer: L.Trainer) -> int:
        epochs = math.ceil(self._planned_steps(trainer) / trainer.num_training_batches)
        return max(1, int(math.log(epochs)))  # the official DiceSGD code's heuristic, floored at 1

    def next_step_entry(self, noise_multiplier: float | None = None) -> tuple[float, float, int]:
        """The accountant entry ``(noise_multiplier, sample_rate, count)`` that the next optimizer step adds (with
        ``noise_multiplier`` in place of the callback's when given); needs the sample rate (set at train start)."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return self._step_entry(sigma, first_step=self.steps == 0)

    def _step_entry(self, noise_multiplier: float, first_step: bool) -> tuple[float, float, int]:
        if not self.error_feedback:
            return (noise_multiplier, self.sample_rate, 1)
        return dicesgd_step_entry(
            self.accountant,
            noise_multiplier,
            self.sample_rate,
            first_step=first_step,
            clip_norm=self.clip_norm,
            feedback_clip_norm=self.feedback_clip_norm,
            batch_size=self.expected_batch_size,
            log_epochs_count=self.accountant_steps_per_step or 1,
        )

    def _calibrate(self, steps: int) -> float:
        if not self.error_feedback or self.accountant == "official_code_log_epochs_heuristic":
            count = self._step_entry(1.0, first_step=True)[2]
            return calibrate_noise_multiplier(self.target_epsilon, self.delta, self.sample_rate, steps * count)

        def epsilon_of(sigma: float) -> float:
            first, later = self._step_entry(sigma, True), self._step_entry(sigma, False)
            return rdp_epsilon([first, (*later[:2], later[2] * (steps - 1))], self.delta)

        return calibrate_by_bisection(epsilon_of, self.target_epsilon)

    def _count_steps_allowed(self) -> int:
        """How many more optimizer steps keep epsilon within ``target_epsilon``."""
        history, allowed = list(self.history), 0
        if self.steps == 0:  # DiceSGD's first step is accounted differently
            first = self._step_entry(self.noise_multiplier, first_step=True)
            if rdp_epsilon([first], self.delta) > self.target_epsilon:
                return 0
            history, allowed = [first], 1
        later = self._step_entry(self.noise_multiplier, first_step=False)
        return allowed + steps_within_budget(history, later, self.delta, self.target_epsilon)

    # -- the step ---------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._read_weight_masks(trainer, pl_module)
        if self.active_per_sample_method == "book_keeping":
            self._book_keeping.clear()
        else:
            named = as_batch(batch)
            self._batch = (named["inputs"], named["targets"])

    def _read_weight_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the pruning callbacks' masks; a change of masks (a prune and rewind) zeroes the error buffer."""
        masks: dict[str, Tensor] = {}
        for callback in trainer.callbacks:
            if callback is not self and isinstance(getattr(callback, "masks", None), dict):
                masks.update(callback.masks)
        parameters = dict(pl_module.named_parameters())
        for name, mask in masks.items():
            if name not in parameters or mask.shape != parameters[name].shape:
                raise ValueError(
                    f"a pruning mask names {name!r} with shape {tuple(mask.shape)}, which is not a parameter of "
                    f"{type(pl_module).__name__} of that shape"
                )
        changed = masks.keys() != self.weight_masks.keys() or any(
            not torch.equal(self.weight_masks[name].to(mask.device), mask) for name, mask in masks.items()
        )
        if changed and self.weight_masks:
            self.error = {}  # rewound weights: residuals of the old weights are stale
        if changed:
            self.weight_masks = {name: mask.detach().clone() for name, mask in masks.items()}

    def _flat_mask(self, pl_module: L.LightningModule, names: list[str], like: Tensor) -> Tensor | None:
        """The live-coordinate mask over ``names``, flattened as the update is (None without pruning)."""
        if not self.weight_masks:
            return None
        parameters = dict(pl_module.named_parameters())
        return torch.cat(
            [
                (self.weight_masks[n] if n in self.weight_masks else torch.ones_like(parameters[n]))
                .to(like.device, like.dtype)
                .flatten()
                for n in names
            ]
        )

    def on_before_optimizer_step(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        if self._steps_allowed is not None and self._steps_allowed <= 0:
            raise RuntimeError(f"the privacy budget target_epsilon={self.target_epsilon} is spent")
        if self.active_per_sample_method == "book_keeping":
            update = self.privatized_gradients_from_backward(pl_module)
        else:
            if self._batch is None:
                raise RuntimeError("ErrorFeedbackDP saw no training batch before the optimizer step")
            inputs, targets = self._batch
            self._batch = None
            update = self.privatized_gradients(pl_module, inputs, targets)
        for name, param in pl_module.named_parameters():
            if name in update:
                param.grad = update[name].to(param.dtype)
        self._record_step()
        self.steps += 1
        if self._steps_allowed is not None:
            self._steps_allowed -= 1
            if self._steps_allowed == 0:
                trainer.should_stop = True

    def _record_step(self) -> None:
        """Add this step to the accountant's history and to the DPSGD-GC comparison (before ``steps`` advances)."""
        for history, entry in (
            (self.history, self.next_step_entry()),
            (self.dpsgd_history, (self.noise_multiplier, self.sample_rate, 1)),
        ):
            if history and history[-1][:2] == entry[:2]:
                history[-1] = (*entry[:2], history[-1][2] + entry[2])
            else:
                history.append(entry)

    def per_sample_gradients(self, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-sample gradients ``{name: (n, *param.shape)}`` of the trainable parameters
        (:func:`lit_methods.privacy.vmap_per_sample_gradients` of ``compute_loss``, in chunks of ``chunk_size``)."""
        return vmap_per_sample_gradients(pl_module, pl_module.compute_loss, inputs, targets, self.chunk_size)

    def privatized_gradients(self, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The privatized update direction ``{name: tensor}`` of one step on this rank's batch (vmap method).

        Updates the error buffer and draws the noise from the callback's generator; callable without a Trainer
        (with ``noise_multiplier`` given; sums are then divided by the realised global batch size unless
        ``expected_batch_size`` is set). Does not advance the accountant.
        """
        per_sample = self.per_sample_gradients(pl_module, inputs, targets)
        names = list(per_sample)
        flat = torch.cat([per_sample[n].flatten(1) for n in names], dim=1)  # (n, num_params)
        del per_sample
        live = self._flat_mask(pl_module, names, flat)
        if live is not None:
            flat = flat * live
        factor = clip_factors(flat.norm(dim=1), self.clip_norm)
        count = torch.tensor([float(len(flat))], device=flat.device)
        parts = [factor @ flat] + ([flat.sum(0)] if self.error_feedback else []) + [count]
        sums = torch.cat(parts)
        if _distributed():
            dist.all_reduce(sums)  # clipped sums, raw sums and sample counts over all ranks
        size = flat.shape[1]
        divisor = self._divisor(sums[-1])
        raw_mean = sums[size : 2 * size] / divisor if self.error_feedback else None
        return self._privatize(pl_module, names, sums[:size] / divisor, raw_mean, divisor)

    def privatized_gradients_from_backward(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The privatized update direction of the step whose forward and backward just ran (book-keeping method).

        Needs :meth:`attach_book_keeping` before that forward (done at setup), and the ordinary gradient in
        ``p.grad`` (the batch-mean loss's, averaged over ranks under DDP). Otherwise as :meth:`privatized_gradients`.
        """
        if self._book_keeping is None:
            raise RuntimeError("privatized_gradients_from_backward needs attach_book_keeping(pl_module) first")
        local_batch, terms = self._book_keeping.terms(masks=self.weight_masks)
        self._book_keeping.clear()
        names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        norms = torch.stack([terms[n].squared_norms for n in names]).sum(0).sqrt()
        weights = [clip_factors(norms, self.clip_norm)]
        raw_from_terms = self.error_feedback and not self._book_keeping.parameter_gradients
        if raw_from_terms:  # no ordinary gradient was computed: the raw sum comes from the same per-sample terms
            weights.append(torch.ones_like(norms))
        sums_by_weight = torch.cat([terms[n].weighted_sums(torch.stack(weights)).flatten(1) for n in names], dim=1)
        del terms
        clipped = sums_by_weight[0]
        count = float(local_batch)
        sums = torch.cat([clipped, torch.tensor([count, count**2], device=clipped.device, dtype=clipped.dtype)])
        if _distributed():
            dist.all_reduce(sums)  # clipped sums, sample counts and squared counts over all ranks
            world = dist.get_world_size()
            total, total_squares = sums[-2].item(), sums[-1].item()
            if world * total_squares != total**2:  # the same decision on every rank
                raise RuntimeError(
                    f"the {world} ranks' batch sizes differ (total {total:.0f}, sum of squares {total_squares:.0f}): "
                    "DDP's averaged gradient is then not the global mean that book-keeping uses; make every rank's "
                    "batch the same size (drop_last=True) or use per_sample_method='vmap'"
                )
        size = clipped.numel()
        divisor = self._divisor(sums[-2])
        raw_mean = None
        if raw_from_terms:
            raw_mean = sums_by_weight[1] / divisor
        elif self.error_feedback:  # DDP's p.grad is the realised global mean: rescaled to the sum over the divisor
            parameters = dict(pl_module.named_parameters())
            raw_mean = torch.cat(
                [
                    (parameters[n].grad if parameters[n].grad is not None else torch.zeros_like(parameters[n]))
                    .detach()
                    .flatten()
                    .to(clipped.dtype)
                    for n in names
                ]
            ) * (sums[-2] / divisor)
        return self._privatize(pl_module, names, sums[:size] / divisor, raw_mean, divisor)

    def _divisor(self, realised_batch_size: Tensor) -> Tensor:
        """The expected global batch size (set at train start), else the realised one (outside a Trainer)."""
        if self.expected_batch_size is None:
            return realised_batch_size
        return torch.full_like(realised_batch_size, float(self.expected_batch_size))

    def _privatize(
        self,
        pl_module: L.LightningModule,
        names: list[str],
        clipped_mean: Tensor,
        raw_mean: Tensor | None,
        batch_size: Tensor,
    ) -> dict[str, Tensor]:
        """Error feedback, buffer update and noise on the global clipped mean (and raw mean for DiceSGD), both
        sums over ``batch_size``."""
        size = clipped_mean.numel()
        direction = clipped_mean
        if self._generator is None:  # called outside a Trainer
            self._generator = self._make_generator(clipped_mean.device)
        noise_stds = [self.noise_multiplier * self.clip_norm / batch_size]
        if self.error_feedback:
            error = self._flat_error(pl_module, names, clipped_mean)
            fed_back = error * clip_factors(error.norm(), self.feedback_clip_norm)
            direction = direction + fed_back
            if self.steps > 0:  # e_0 = 0 releases nothing: the second noise term starts at step 1 (official code)
                noise_stds.append(self.noise_multiplier * self.feedback_clip_norm / batch_size)
            error = error + raw_mean - direction
            live = self._flat_mask(pl_module, names, error)
            if live is not None:  # no residual on pruned coordinates
                error = error * live
            self.error = dict(zip(names, self._unflatten(pl_module, names, error)))
        if self.noise_multiplier > 0:
            for std in noise_stds:  # independent draws, as in the official code
                direction = direction + std * torch.randn(size, generator=self._generator, device=direction.device)
        return dict(zip(names, self._unflatten(pl_module, names, direction)))

    def _flat_error(self, pl_module: L.LightningModule, names: list[str], like: Tensor) -> Tensor:
        if not self.error:
            return torch.zeros_like(like)
        return torch.cat([self.error[n].to(like.device).flatten() for n in names])

    @staticmethod
    def _unflatten(pl_module: L.LightningModule, names: list[str], flat: Tensor) -> list[Tensor]:
        shapes = dict(pl_module.named_parameters())
        sizes = [shapes[n].numel() for n in names]
        return [chunk.view_as(shapes[n]) for chunk, n in zip(flat.split(sizes), names)]

    # -- accounting, logging, checkpointing ---------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """The epsilon spent so far (the budgeted accounting; see the class doc)."""
        return rdp_epsilon(self.history, self.delta)

    @property
    def epsilon_dpsgd(self) -> float:
        """The DPSGD-GC bound of the steps taken (each counted once); for DiceSGD a comparison, not a guarantee."""
        return rdp_epsilon(self.dpsgd_history, self.delta)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the same value on every rank: sync_dist only silences Lightning's warning
        pl_module.log("dp/epsilon", self.epsilon, sync_dist=True)
        if self.error_feedback:
            pl_module.log("dp/epsilon_dpsgd", self.epsilon_dpsgd, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "accountant": self.accountant,
            "accountant_steps_per_step": self.accountant_steps_per_step,
            "steps": self.steps,
            "history": [list(entry) for entry in self.history],
            "dpsgd_history": [list(entry) for entry in self.dpsgd_history],
            "error": {name: e.detach().cpu() for name, e in self.error.items()},
            "weight_masks": {name: m.detach().cpu() for name, m in self.weight_masks.items()},
            "generator_state": self._generator.get_state() if self._generator is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.noise_multiplier = state_dict["noise_multiplier"]
        if "accountant" not in state_dict:
            raise ValueError(
                "the checkpoint's ErrorFeedbackDP state predates the sample rate q = B / N and DiceSGD's accountants "
                "(its epsilon is not comparable): start a fresh run"
            )
        if state_dict["accountant"] != self.accountant:
            raise ValueError(
                f"the checkpoint was accounted with accountant={state_dict['accountant']!r}, this callback uses "
                f"accountant={self.accountant!r}: epsilon would mix two analyses"
            )
        self.sample_rate = state_dict["sample_rate"]
        self.expected_batch_size = state_dict["expected_batch_size"]
        self.accountant_steps_per_step = state_dict["accountant_steps_per_step"]
        self.steps = state_dict["steps"]
        self.history = [(float(s), float(q), int(n)) for s, q, n in state_dict["history"]]
        self.dpsgd_history = [(float(s), float(q), int(n)) for s, q, n in state_dict["dpsgd_history"]]
        self.error = dict(state_dict["error"])
        self.weight_masks = dict(state_dict["weight_masks"])
        self._generator_state = state_dict["generator_state"]
