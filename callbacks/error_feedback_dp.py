"""Differentially private training by per-sample clipping, with DiceSGD's error feedback or as plain DP-SGD.

DiceSGD: Zhang, Bu, Wu, Hong, "Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach",
ICLR 2024, https://arxiv.org/abs/2311.14632. The baseline (``error_feedback=False``) is DP-SGD with gradient
clipping (DPSGD-GC): Abadi et al., "Deep Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lit_methods.datamodules.batch import as_batch
from lit_methods.privacy import (
    BookKeeping,
    calibrate_noise_multiplier,
    clip_factors,
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


class ErrorFeedbackDP(Callback):
    """DiceSGD (per-sample clipping + clipped error feedback + Gaussian noise), or DP-SGD with gradient clipping.

    Zhang et al., "Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach", ICLR 2024,
    https://arxiv.org/abs/2311.14632. Each optimizer step, with the batch's per-sample gradients ``g_i`` (``B``
    samples over all ranks), ``C1 = clip_norm``, ``C2 = feedback_clip_norm``, ``sigma = noise_multiplier`` and
    the error buffer ``e`` (zero at the start; norms are global over all trainable parameters)::

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

    Sampling and accounting: epsilon comes from opacus' RDP accountant of the sub-sampled Gaussian mechanism with
    sample rate ``q = 1 / trainer.num_training_batches`` (one batch of ``B`` out of ``N ~ num_batches * B``
    samples), ``noise_multiplier`` and ``delta``. That analysis assumes Poisson sampling; our loaders draw
    shuffled fixed-size batches (without replacement), for which it is the customary approximation, not a proof
    (as in the official code and most DP-SGD papers). For DiceSGD, the paper's theorem is not implemented (its
    constant was not available to us); following the official code's heuristic each optimizer step is counted
    ``accountant_steps_per_step`` times (default ``max(1, floor(ln E))`` for ``E`` planned epochs), and
    ``dp/epsilon_dpsgd`` reports the DPSGD-GC bound for comparison. Neither is the paper's bound.

    ``target_epsilon`` calibrates the noise with opacus' ``get_noise_multiplier`` for the planned number of steps
    (``trainer.estimated_stepping_batches``). Epsilon is logged every epoch (``dp/epsilon``) and checkpointed with
    the accountant's history, the error buffer and the noise generator, so a resumed run continues exactly and
    never resets the spent budget (nor re-calibrates the noise). With ``target_epsilon``, training stops
    (``trainer.should_stop``) after the last step whose epsilon stays within the budget; no step ever exceeds it
    (a step that would, e.g. forced by ``min_epochs``, raises).

    Under DDP each rank clips its own samples; the clipped sums and sample counts (vmap: also the raw sums for the
    buffer; book-keeping takes the raw mean from DDP's averaged gradient) are summed over ranks with one
    all-reduce, and every rank draws the same noise from the callback's generator (same seed and state), so the
    update equals the single-process update on the same global batch.

    Cost (``benchmarks/dp_step.py``, GroupNorm ResNet-20, batch 64, CPU): a DiceSGD step with book-keeping per-sample
    clipping takes 1.9x a non-private step and 0.7x an opacus ``GradSampleModule`` step.

    Args:
        clip_norm: per-sample clipping threshold ``C1`` (``> 0``; ``inf`` disables clipping).
        noise_multiplier: ``sigma``; give this or ``target_epsilon``.
        target_epsilon: the privacy budget; the noise is calibrated to spend it over the planned steps.
        delta: the ``delta`` of ``(epsilon, delta)``-DP, in ``(0, 1)``.
        error_feedback: DiceSGD (``True``) or DPSGD-GC (``False``).
        feedback_clip_norm: ``C2``, the threshold of the fed-back error; ``clip_norm`` when omitted (the paper's
            and official code's default ``C1 = C2``).
        accountant_steps_per_step: how many accountant steps one optimizer step counts for (see above).
        seed: seed of the noise generator (the same on every rank).
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
        accountant_steps_per_step: int | None = None,
        seed: int = 0,
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
        self.accountant_steps_per_step = accountant_steps_per_step
        self.seed = seed
        self.chunk_size = chunk_size
        self.per_sample_method = per_sample_method
        require_opacus("ErrorFeedbackDP")  # fail at construction when opacus is missing
        # state (checkpointed)
        self.sample_rate: float | None = None
        self.steps = 0
        self.history: list[tuple[float, float, int]] = []  # accountant history, in accountant steps
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
            self.sample_rate = 1.0 / trainer.num_training_batches
            if self.accountant_steps_per_step is None:
                self.accountant_steps_per_step = self._default_steps_per_step(trainer)
            if self.target_epsilon is not None:
                self.noise_multiplier = self._calibrate(trainer)
        if self._generator is None or self._generator_state is not None:  # fresh, or restored from a checkpoint
            self._generator = self._make_generator(pl_module.device)  # (a reused callback keeps drawing fresh noise)
            self._generator_state = None
        if self.target_epsilon is not None:
            self._steps_allowed = self._count_steps_allowed()
            if self._steps_allowed == 0:
                trainer.should_stop = True

    def _make_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        if self._generator_state is not None:
            generator.set_state(self._generator_state)
        return generator

    def _planned_steps(self, trainer: L.Trainer) -> int:
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("set max_epochs or max_steps: the privacy accounting needs the planned number of steps")
        return int(steps)

    def _default_steps_per_step(self, trainer: L.Trainer) -> int:
        if not self.error_feedback:
            return 1
        epochs = math.ceil(self._planned_steps(trainer) / trainer.num_training_batches)
        return max(1, int(math.log(epochs)))  # the official DiceSGD code's heuristic, floored at 1

    def _calibrate(self, trainer: L.Trainer) -> float:
        steps = self._planned_steps(trainer) * self.accountant_steps_per_step
        return calibrate_noise_multiplier(self.target_epsilon, self.delta, self.sample_rate, steps)

    def _count_steps_allowed(self) -> int:
        """How many more optimizer steps keep epsilon within ``target_epsilon``."""
        return steps_within_budget(
            self.history,
            self.noise_multiplier,
            self.sample_rate,
            self.accountant_steps_per_step,
            self.delta,
            self.target_epsilon,
        )

    # -- the step ---------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.active_per_sample_method == "book_keeping":
            self._book_keeping.clear()
        else:
            named = as_batch(batch)
            self._batch = (named["inputs"], named["targets"])

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
        self.steps += 1
        self._record_step()
        if self._steps_allowed is not None:
            self._steps_allowed -= 1
            if self._steps_allowed == 0:
                trainer.should_stop = True

    def _record_step(self) -> None:
        entry = (
            self.noise_multiplier,
            self.sample_rate,
            self.accountant_steps_per_step,
        )
        if self.history and self.history[-1][:2] == entry[:2]:
            self.history[-1] = (*entry[:2], self.history[-1][2] + entry[2])
        else:
            self.history.append(entry)

    def per_sample_gradients(self, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-sample gradients ``{name: (n, *param.shape)}`` of the trainable parameters
        (:func:`lit_methods.privacy.vmap_per_sample_gradients` of ``compute_loss``, in chunks of ``chunk_size``)."""
        return vmap_per_sample_gradients(pl_module, pl_module.compute_loss, inputs, targets, self.chunk_size)

    def privatized_gradients(self, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The privatized update direction ``{name: tensor}`` of one step on this rank's batch (vmap method).

        Updates the error buffer and draws the noise from the callback's generator; callable without a Trainer
        (with ``noise_multiplier`` given). Does not advance the accountant.
        """
        per_sample = self.per_sample_gradients(pl_module, inputs, targets)
        names = list(per_sample)
        flat = torch.cat([per_sample[n].flatten(1) for n in names], dim=1)  # (n, num_params)
        del per_sample
        factor = clip_factors(flat.norm(dim=1), self.clip_norm)
        count = torch.tensor([float(len(flat))], device=flat.device)
        parts = [factor @ flat] + ([flat.sum(0)] if self.error_feedback else []) + [count]
        sums = torch.cat(parts)
        if _distributed():
            dist.all_reduce(sums)  # clipped sums, raw sums and sample counts over all ranks
        size = flat.shape[1]
        batch_size = sums[-1]
        raw_mean = sums[size : 2 * size] / batch_size if self.error_feedback else None
        return self._privatize(pl_module, names, sums[:size] / batch_size, raw_mean, batch_size)

    def privatized_gradients_from_backward(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The privatized update direction of the step whose forward and backward just ran (book-keeping method).

        Needs :meth:`attach_book_keeping` before that forward (done at setup), and the ordinary gradient in
        ``p.grad`` (the batch-mean loss's, averaged over ranks under DDP). Otherwise as :meth:`privatized_gradients`.
        """
        if self._book_keeping is None:
            raise RuntimeError("privatized_gradients_from_backward needs attach_book_keeping(pl_module) first")
        local_batch, terms = self._book_keeping.terms()
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
        batch_size = sums[-2]
        raw_mean = None
        if raw_from_terms:
            raw_mean = sums_by_weight[1] / local_batch
        elif self.error_feedback:
            parameters = dict(pl_module.named_parameters())
            raw_mean = torch.cat(
                [
                    (parameters[n].grad if parameters[n].grad is not None else torch.zeros_like(parameters[n]))
                    .detach()
                    .flatten()
                    .to(clipped.dtype)
                    for n in names
                ]
            )
        return self._privatize(pl_module, names, sums[:size] / batch_size, raw_mean, batch_size)

    def _privatize(
        self,
        pl_module: L.LightningModule,
        names: list[str],
        clipped_mean: Tensor,
        raw_mean: Tensor | None,
        batch_size: Tensor,
    ) -> dict[str, Tensor]:
        """Error feedback, buffer update and noise on the global clipped mean (and raw mean for DiceSGD)."""
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
        """The DPSGD-GC bound of the steps taken (each counted once)."""
        history = [(sigma, q, steps // self.accountant_steps_per_step) for sigma, q, steps in self.history]
        return rdp_epsilon(history, self.delta)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the same value on every rank: sync_dist only silences Lightning's warning
        pl_module.log("dp/epsilon", self.epsilon, sync_dist=True)
        if self.error_feedback:
            pl_module.log("dp/epsilon_dpsgd", self.epsilon_dpsgd, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "accountant_steps_per_step": self.accountant_steps_per_step,
            "steps": self.steps,
            "history": [list(entry) for entry in self.history],
            "error": {name: e.detach().cpu() for name, e in self.error.items()},
            "generator_state": self._generator.get_state() if self._generator is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.noise_multiplier = state_dict["noise_multiplier"]
        self.sample_rate = state_dict["sample_rate"]
        self.accountant_steps_per_step = state_dict["accountant_steps_per_step"]
        self.steps = state_dict["steps"]
        self.history = [(float(s), float(q), int(n)) for s, q, n in state_dict["history"]]
        self.error = dict(state_dict["error"])
        self._generator_state = state_dict["generator_state"]
