"""DHSPG, the dual half-space projected gradient optimizer of OTOv2, over zero-invariant channel groups.

Chen et al., "OTOv2: Automatic, Generic, User-Friendly", ICLR 2023, https://arxiv.org/abs/2303.06862; written after
the legacy ``only_train_once/optimizer/dhspg.py`` (OTOv2 version) of the official repository
(github.com/tianyic/only_train_once), as summarised in the project's card. A zero-invariant group (ZIG) is one
channel of a :class:`~lit_methods.pruning.structured.ChannelGroup`: its out-side slices (filters, biases, BN scale
and shift of every producer). When they are all zero, the channel outputs exactly zero and can be removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .structured import ChannelGroup

__all__ = ["DHSPG"]


class DHSPG(Optimizer):
    """SGD (with momentum and weight decay) that drives ``target_group_sparsity`` of the ZIGs to exact zeros.

    Stages, counted in optimizer steps: (1) warm-up, ``partition_step`` plain SGD steps; (2) partition, once: each
    ZIG gets ``score = 0.5 * n(cos(-x_g, -d_g)) + 0.5 * n(1 / (||x_g|| / |g| + 1e-6))`` (``n``: division by the L2
    norm over all groups) and the ``round((target_group_sparsity + tolerance) * N)`` highest-scoring ZIGs form the
    redundant set; (3) afterwards the other ZIGs take plain steps and the redundant ones the trial point
    ``x - lr d - lr lambda_g x_g / ||x_g||`` with the adaptive ``lambda_g`` (raised, up to ``hat_lmbda_coeff *
    lmbda``, when the descent direction opposes shrinking, and capped by the bound that keeps the step a descent
    step); (4) from ``projection_step`` on, the half-space projection sets a redundant ZIG to exactly zero when
    ``<x_hat_g, x_g> < epsilon ||x_g||^2``. Zero ZIGs stay zero (their slices and momentum are reset every step).
    The official code's random cap on projections is not needed: only redundant ZIGs are projected, and their count is
    the cap. The stage position, redundant set and zero set are kept in the (only) parameter group, so they are part
    of the optimizer's ``state_dict`` and a resumed run continues exactly.

    Args:
        params: the parameters (one group).
        groups: the channel groups, whose ``out_slices`` name parameters in ``named_params``.
        named_params: ``name -> parameter`` of the model the groups were built on.
        lr: learning rate.
        momentum: SGD momentum (official default for the sgd variant: 0).
        weight_decay: L2 added to the gradient.
        target_group_sparsity: share of ZIGs to zero, in (0, 1).
        tolerance: extra share put in the redundant set (official: 0 for ResNet-50, 0.21 for VGG-16).
        partition_step: optimizer steps of warm-up before the partition.
        projection_step: first step of half-space projection (>= ``partition_step``).
        lmbda: base group-lasso coefficient ``lambda``.
        lmbda_amplify: amplification of the adaptive ``lambda_g`` (official: 1.1).
        hat_lmbda_coeff: ``lambda_g`` is at most ``hat_lmbda_coeff * lmbda`` (official: 10).
        epsilon: half-space threshold in [0, 1) (official tutorials: 0.9-0.95).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        groups: Sequence[ChannelGroup],
        named_params: Mapping[str, nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        target_group_sparsity: float = 0.5,
        tolerance: float = 0.0,
        partition_step: int = 1000,
        projection_step: int = 2000,
        lmbda: float = 1e-3,
        lmbda_amplify: float = 1.1,
        hat_lmbda_coeff: float = 10.0,
        epsilon: float = 0.9,
    ) -> None:
        if not 0.0 < target_group_sparsity < 1.0:
            raise ValueError(f"target_group_sparsity must lie in (0, 1), got {target_group_sparsity}")
        if not 0.0 <= tolerance < 1.0 - target_group_sparsity:
            raise ValueError(f"tolerance must lie in [0, 1 - target_group_sparsity), got {tolerance}")
        if not isinstance(partition_step, int) or partition_step < 0:
            raise ValueError(f"partition_step must be an int >= 0, got {partition_step!r}")
        if not isinstance(projection_step, int) or projection_step < partition_step:
            raise ValueError(f"projection_step must be an int >= partition_step={partition_step}, got {projection_step!r}")
        if lmbda <= 0 or lmbda_amplify < 1 or hat_lmbda_coeff < 1:
            raise ValueError(
                f"need lmbda > 0, lmbda_amplify >= 1, hat_lmbda_coeff >= 1; got {lmbda}, {lmbda_amplify}, {hat_lmbda_coeff}"
            )
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must lie in [0, 1), got {epsilon}")
        if not groups:
            raise ValueError("DHSPG needs at least one channel group")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, dhspg_step=0,
            redundant=[[] for _ in groups], zero=[[] for _ in groups],
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DHSPG takes its parameters as one group")
        own = {id(p) for p in self.param_groups[0]["params"]}
        for group in groups:
            for name, _ in group.out_slices:
                if id(named_params[name]) not in own:
                    raise ValueError(f"the ZIG parameter {name!r} is not among the optimized parameters")
        self.groups = list(groups)
        self.named_params = dict(named_params)
        self.target_group_sparsity = target_group_sparsity
        self.tolerance = tolerance
        self.partition_step = partition_step
        self.projection_step = projection_step
        self.lmbda = lmbda
        self.lmbda_amplify = lmbda_amplify
        self.hat_lmbda_coeff = hat_lmbda_coeff
        self.epsilon = epsilon

    # -- per-ZIG reductions over the out-side slices ---------------------------------------------------------------
    def _reduce(self, group: ChannelGroup, first: Callable[[str], Tensor], second: Callable[[str], Tensor]) -> Tensor:
        """Per channel of ``group``: sum over its out-side slices of ``first(name) * second(name)``."""
        total = None
        for name, idxs in group.out_slices:
            idxs = idxs.to(self.named_params[name].device)
            product = (first(name).index_select(0, idxs) * second(name).index_select(0, idxs)).reshape(len(idxs), -1).sum(1)
            total = product if total is None else total + product
        return total

    def _directions(self) -> dict[int, Tensor]:
        directions = {}
        options = self.param_groups[0]
        for param in options["params"]:
            if param.grad is None:
                continue
            d = param.grad.detach()
            if options["weight_decay"]:
                d = d.add(param.detach(), alpha=options["weight_decay"])
            if options["momentum"]:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(options["momentum"]).add_(d)
                d = state["momentum_buffer"]
            directions[id(param)] = d
        return directions

    def group_sparsity(self) -> float:
        """Share of ZIGs that are exactly zero."""
        zero = sum(len(z) for z in self.param_groups[0]["zero"])
        return zero / sum(g.num_channels for g in self.groups)

    @torch.no_grad()
    def _partition(self, directions: dict[int, Tensor]) -> None:
        params = self.named_params
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}

        def direction(name: str) -> Tensor:
            return directions.get(id(params[name]), zeros[name])

        cosines, inverse_norms, sizes = [], [], []
        for group in self.groups:
            x_dot_d = self._reduce(group, lambda n: params[n], direction)
            x_norm = self._reduce(group, lambda n: params[n], lambda n: params[n]).sqrt()
            d_norm = self._reduce(group, direction, direction).sqrt()
            entries = sum(params[n][0].numel() for n, _ in group.out_slices)
            cosines.append(x_dot_d / (x_norm * d_norm + 1e-12))
            inverse_norms.append(1.0 / (x_norm / entries + 1e-6))
            sizes.append(group.num_channels)
        cosine, inverse_norm = torch.cat(cosines), torch.cat(inverse_norms)
        score = 0.5 * cosine / cosine.norm().clamp_min(1e-12) + 0.5 * inverse_norm / inverse_norm.norm()
        count = round((self.target_group_sparsity + self.tolerance) * len(score))
        chosen = torch.zeros(len(score), dtype=torch.bool, device=score.device)
        chosen[torch.argsort(score, descending=True, stable=True)[:count]] = True
        self.param_groups[0]["redundant"] = [
            [int(i) for i in part.nonzero().flatten()] for part in chosen.split(sizes)
        ]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        options = self.param_groups[0]
        options["dhspg_step"] += 1
        step, lr = options["dhspg_step"], options["lr"]
        directions = self._directions()
        if step == self.partition_step + 1:
            self._partition(directions)
        params = self.named_params
        old = {name: params[name].detach().clone() for g in self.groups for name, _ in g.out_slices}
        for param in options["params"]:
            if id(param) in directions:
                param.add_(directions[id(param)], alpha=-lr)
        if step > self.partition_step:
            zeros = {name: torch.zeros_like(p) for name, p in old.items()}

            def direction(name: str) -> Tensor:
                return directions.get(id(params[name]), zeros[name])

            for index, group in enumerate(self.groups):
                zero = set(options["zero"][index])
                active = [c for c in options["redundant"][index] if c not in zero]
                if not active:
                    continue
                channels = torch.as_tensor(active, dtype=torch.long, device=next(iter(old.values())).device)
                x_norm = self._reduce(group, lambda n: old[n], lambda n: old[n]).sqrt()[channels]
                x_dot_d = self._reduce(group, lambda n: old[n], direction)[channels]
                d_sq = self._reduce(group, direction, direction)[channels]
                lmbda = torch.full_like(x_norm, self.lmbda)
                opposing = x_dot_d < 0
                lower = -x_dot_d / x_norm.clamp_min(1e-12)
                adaptive = (self.lmbda_amplify * lower).clamp(self.lmbda, self.lmbda * self.hat_lmbda_coeff)
                upper = -d_sq * x_norm / x_dot_d.clamp_max(-1e-12)
                adaptive = torch.where(adaptive > upper, 0.5 * (lower + upper), adaptive)
                lmbda = torch.where(opposing, adaptive, lmbda)
                shrink = lr * lmbda / x_norm.clamp_min(1e-12)
                for name, idxs in group.out_slices:
                    rows = idxs.to(channels.device)[channels]
                    view = (-1,) + (1,) * (old[name].dim() - 1)
                    params[name].index_add_(0, rows, -shrink.view(view) * old[name].index_select(0, rows))
                if step > self.projection_step:
                    inner = self._reduce(group, lambda n: params[n], lambda n: old[n])[channels]
                    project = inner < self.epsilon * x_norm.pow(2)
                    options["zero"][index] = sorted(zero | {active[i] for i in project.nonzero().flatten().tolist()})
        self._enforce_zeros()
        return loss

    @torch.no_grad()
    def _enforce_zeros(self) -> None:
        options = self.param_groups[0]
        for index, group in enumerate(self.groups):
            if not options["zero"][index]:
                continue
            channels = torch.as_tensor(options["zero"][index], dtype=torch.long)
            for name, idxs in group.out_slices:
                param = self.named_params[name]
                rows = idxs[channels].to(param.device)
                param.index_fill_(0, rows, 0.0)
                buffer = self.state[param].get("momentum_buffer")
                if buffer is not None:
                    buffer.index_fill_(0, rows, 0.0)
