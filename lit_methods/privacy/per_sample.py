"""Per-sample gradients for DP training: norms and clipped sums from one ordinary backward ("book-keeping"), and
the ``torch.func`` per-sample gradients of any model (:func:`vmap_per_sample_gradients`).

Book-keeping follows Bu, Mao, Xu, Karypis, "Differentially Private Optimization on Large Model at Small Cost"
(book-keeping, hybrid ghost norm), https://arxiv.org/abs/2210.00038; Li, Tramer, Liang, Hashimoto, "Large Language
Models Can Be Strong Differentially Private Learners" (ghost clipping), https://arxiv.org/abs/2110.05679.

Forward hooks keep each supported layer's input ``a``; a tensor hook on its output keeps the gradient ``g`` of the
loss with respect to that output, during the one ordinary backward. A Linear or Conv2d weight's per-sample gradient
is ``G_i = g_i^T a_i`` with ``a_i`` of shape ``(T, d_in)`` (Conv2d: the unfolded input, ``T`` output positions) and
``g_i`` of shape ``(T, d_out)``. Its squared norm is taken either from ``G_i`` (materialized) or, without forming
``G_i``, as ``sum((a_i a_i^T) * (g_i g_i^T))`` (ghost norm). The clipped sum ``sum_i c_i G_i`` is then one matmul
over the batch (ghost layers) or a weighted sum of the materialized ``G_i``; no second backward is run. As the
per-sample terms give every weighted sum (the clipped one and the plain one), the ordinary backward need not
compute the batch gradient of the tracked parameters at all: with ``parameter_gradients=False`` they are taken
out of the autograd graph during the training forward, and the backward computes input gradients only.

Which rule: the paper's hybrid picks the one of less memory (ghost when ``2 T^2 < d_in d_out``). But the ghost
norm's ``T^2 (d_in + d_out)`` multiply-adds come on top of the clipped sum's matmul (``T d_in d_out``, the cost of
materializing ``G_i``, after which the clipped sum is cheap): timed on CPU for ResNet-20's last stage (``T = 64``,
576 -> 64, where the paper's rule picks ghost), materializing was faster. So ghost is used only when its norm costs
under half the materializing matmul,
``T (d_in + d_out) < d_in d_out / 2`` (which also implies the paper's memory condition): vector inputs (``T = 1``)
and long sequences through wide layers. Conv2d per-sample weight gradients are materialized with
``torch.func.vmap`` over the convolution's weight backward (a grouped convolution: on CPU several times faster than
unfolding the input and a batched matmul for ResNet-20's first stages, about as fast for the last). Biases and
GroupNorm/LayerNorm affine parameters have small per-sample gradients, which are materialized (opacus' per-layer
rules for the norm layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.hooks import RemovableHandle

__all__ = [
    "BookKeeping",
    "PerSampleTerm",
    "unsupported_trainable_layers",
    "vmap_per_sample_gradients",
]

_NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)


def _is_supported(module: nn.Module) -> bool:
    if any(name not in ("weight", "bias") for name, _ in module.named_parameters(recurse=False)):
        return False  # e.g. torch.nn.utils.prune's "weight_orig": the layer computes its weight
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module) in (nn.Linear, nn.GroupNorm, nn.LayerNorm)


def unsupported_trainable_layers(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every module that owns a trainable parameter and that :class:`BookKeeping` cannot handle.

    Supported: ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, ``padding_mode="zeros"``; any stride, padding, dilation),
    ``nn.GroupNorm`` and ``nn.LayerNorm``, each called once per forward; Conv2d's padding given as numbers (not
    ``"same"``/``"valid"``); parameters not shared between layers (tied weights are listed).
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(name)
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    unsupported = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if name in shared:  # tied weights: the per-layer terms of one parameter would need adding up
            unsupported.append(f"{name!r} ({type(module).__name__}, shares a parameter with another layer)")
        elif not _is_supported(module):
            unsupported.append(f"{name!r} ({type(module).__name__})")
    return unsupported


@dataclass
class PerSampleTerm:
    """One parameter's per-sample squared gradient norms ``(B,)`` and ``weighted_sums``, which maps ``K`` rows of
    per-sample weights ``(K, B)`` to the ``K`` weighted sums of the per-sample gradients ``(K, *parameter shape)``."""

    squared_norms: Tensor  # (B,)
    weighted_sums: Callable[[Tensor], Tensor]  # (K, B) weights -> (K, *parameter shape)

    def scaled(self, factor: float) -> PerSampleTerm:
        """The term of the per-sample gradients multiplied by ``factor``."""
        return PerSampleTerm(self.squared_norms * factor**2, lambda weights: self.weighted_sums(weights * factor))


def _materialized(per_sample: Tensor) -> PerSampleTerm:
    rows = per_sample.flatten(1)
    return PerSampleTerm(
        squared_norms=torch.linalg.vector_norm(rows, dim=1).square(),
        weighted_sums=lambda weights: (weights @ rows).view(len(weights), *per_sample.shape[1:]),
    )


def _use_ghost_norm(positions: int, d_in: int, d_out: int) -> bool:
    return 2 * positions * (d_in + d_out) < d_in * d_out


def _ghost_term(rows_in: Tensor, rows_out: Tensor, shape: torch.Size) -> PerSampleTerm:
    """Ghost norm of a weight mapping rows ``(B, T, d_in) -> (B, T, d_out)``, and its weighted sum as one matmul."""
    positions = rows_in.shape[1]
    if positions == 1:
        squared_norms = rows_in.pow(2).sum((1, 2)) * rows_out.pow(2).sum((1, 2))
    else:
        gram_in = torch.bmm(rows_in, rows_in.transpose(1, 2))
        gram_out = torch.bmm(rows_out, rows_out.transpose(1, 2))
        squared_norms = (gram_in * gram_out).sum((1, 2))

    def weighted_sums(weights: Tensor) -> Tensor:
        weighted_out = (rows_out * weights[:, :, None, None]).flatten(1, 2)  # (K, B T, d_out)
        return (weighted_out.transpose(1, 2) @ rows_in.flatten(0, 1)).view(len(weights), *shape)

    return PerSampleTerm(squared_norms=squared_norms, weighted_sums=weighted_sums)


def _layer_terms(
    module: nn.Module,
    inputs: Tensor,
    output_grads: Tensor,
    trainable: dict[str, nn.Parameter],
    masks: dict[str, Tensor],
) -> dict[str, PerSampleTerm]:
    """Terms of ``module``'s ``trainable`` parameters (local names) from its input and output gradient; a parameter
    with a 0/1 mask in ``masks`` (local names) gets the terms of its masked per-sample gradients (materialized)."""

    def materialized(name: str, per_sample: Tensor) -> PerSampleTerm:
        return _materialized(per_sample * masks[name] if name in masks else per_sample)

    terms: dict[str, PerSampleTerm] = {}
    if isinstance(module, _NORM_LAYERS):
        from opacus.grad_sample import GradSampleModule

        per_sample = GradSampleModule.GRAD_SAMPLERS[type(module)](module, [inputs], output_grads)
        return {name: materialized(name, per_sample[p]) for name, p in trainable.items()}
    batch = inputs.shape[0]
    inputs = inputs.to(output_grads.dtype)
    if isinstance(module, nn.Conv2d):
        rows_out = output_grads.reshape(batch, module.out_channels, -1).transpose(1, 2)
        d_in = module.weight[0].numel()
        ghost = "weight" not in masks and _use_ghost_norm(rows_out.shape[1], d_in, module.out_channels)
        if "weight" in trainable and ghost:
            from opacus.utils.tensor_utils import unfold2d

            rows_in = unfold2d(
                inputs,
                kernel_size=module.kernel_size,
                padding=module.padding,
                stride=module.stride,
                dilation=module.dilation,
            ).transpose(1, 2)
            terms["weight"] = _ghost_term(rows_in, rows_out, module.weight.shape)
        elif "weight" in trainable:
            terms["weight"] = materialized("weight", _conv_weight_per_sample(module, inputs, output_grads))
    else:  # Linear: (B, ..., d) -> (B, T, d)
        rows_in = inputs.reshape(batch, -1, module.in_features)
        rows_out = output_grads.reshape(batch, -1, module.out_features)
        if "weight" in trainable:
            if "weight" not in masks and _use_ghost_norm(rows_in.shape[1], module.in_features, module.out_features):
                terms["weight"] = _ghost_term(rows_in, rows_out, module.weight.shape)
            else:
                per_sample = torch.bmm(rows_out.transpose(1, 2), rows_in)
                terms["weight"] = materialized("weight", per_sample.view(-1, *module.weight.shape))
    if "bias" in trainable:
        terms["bias"] = materialized("bias", rows_out.sum(1))
    return terms


def _conv_weight_per_sample(module: nn.Conv2d, inputs: Tensor, output_grads: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)``: the weight backward of each one-sample convolution."""
    weight = module.weight.detach().to(output_grads.dtype)

    def weight_gradient(sample_input: Tensor, sample_output_grad: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward(
            sample_output_grad[None],
            sample_input[None],
            weight,
            None,
            list(module.stride),
            list(module.padding),
            list(module.dilation),
            False,
            [0, 0],
            module.groups,
            [False, True, False],
        )[1]

    return torch.func.vmap(weight_gradient)(inputs, output_grads)


class BookKeeping:
    """Per-sample gradient norms and weighted (clipped) gradient sums of ``model``'s trainable parameters.

    Hooks are registered at construction and removed by :meth:`remove`. A forward in training mode with autograd
    enabled records each supported layer's input and, during the backward, the gradient of its output; the loss
    must be a mean over the batch (per-sample gradients are ``B`` times the recorded ones, ``B`` the batch size).
    :meth:`clear` drops the records. Raises ``TypeError`` naming the layers when a trainable parameter belongs to a
    module that is not supported (see :func:`unsupported_trainable_layers`).

    Args:
        model: the module whose trainable parameters are tracked; parameter names are ``model.named_parameters()``'s.
        parameter_gradients: whether the ordinary backward still computes the tracked parameters' batch gradients
            (``p.grad``). ``False`` saves that work: each tracked layer runs its training forward with its
            parameters' ``requires_grad`` switched off (and back on right after), so the backward computes input
            gradients only and ``p.grad`` stays ``None``; :meth:`terms` gives every weighted sum, the plain one
            (ones as weights) included. The first tracked layer whose input needs no gradient gets an output that
            does, so that the gradients of its output are still recorded. Not for a model wrapped in DDP, whose
            reducer expects every parameter's gradient.
    """

    def __init__(self, model: nn.Module, parameter_gradients: bool = True) -> None:
        unsupported = unsupported_trainable_layers(model)
        if unsupported:
            raise TypeError(
                "book-keeping per-sample clipping supports trainable Linear, Conv2d (groups=1, zero padding), "
                f"GroupNorm and LayerNorm layers only; unsupported: {', '.join(unsupported)}"
            )
        self.parameter_gradients = parameter_gradients
        self._layers = {
            module: name
            for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        }
        self._records: dict[nn.Module, list[_Record]] = {}
        self._handles: list[RemovableHandle] = [module.register_forward_hook(self._record) for module in self._layers]
        if not parameter_gradients:
            for module in self._layers:
                self._handles.append(module.register_forward_pre_hook(self._detach_parameters))
                self._handles.append(module.register_forward_hook(self._reattach_parameters, always_call=True))
        self._detached: dict[nn.Module, dict[str, nn.Parameter]] = {}

    @staticmethod
    def _recording(module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _detach_parameters(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self._recording(module):
            trainable = {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}
            for p in trainable.values():
                p.requires_grad_(False)
            self._detached[module] = trainable

    def _reattach_parameters(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor | None) -> None:
        for p in self._detached.pop(module, {}).values():  # also when the forward raised
            p.requires_grad_(True)

    def _record(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if self.parameter_gradients:
            trainable = {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}
        else:
            trainable = self._detached.get(module, {})
            if trainable and not output.requires_grad and self._recording(module):
                output = output.detach().requires_grad_().clone()  # a non-leaf, so in-place ops may follow
        if not (trainable and self._recording(module) and output.requires_grad):
            return None
        record = _Record(args[0].detach(), trainable)
        self._records.setdefault(module, []).append(record)

        def keep_gradient(gradient: Tensor) -> None:
            record.output_grad = gradient.detach()

        output.register_hook(keep_gradient)
        return None if self.parameter_gradients else output

    def clear(self) -> None:
        self._records.clear()

    def remove(self) -> None:
        """Remove the hooks and the records."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def terms(self, masks: dict[str, Tensor] | None = None) -> tuple[int, dict[str, PerSampleTerm]]:
        """The batch size and each trainable parameter's terms (full names) of the recorded forward/backward.

        ``masks`` maps parameter names to 0/1 tensors of their shape (pruned weights): those parameters' terms
        are of the masked per-sample gradients, so norms and sums cover the live coordinates only.
        """
        masks = masks or {}
        if not self._records:
            raise RuntimeError("book-keeping recorded no training forward/backward (no layer saw a grad-enabled batch)")
        batch_sizes = {records[0].inputs.shape[0] for records in self._records.values()}
        if len(batch_sizes) != 1:
            raise RuntimeError(f"the recorded layers saw different batch sizes {sorted(batch_sizes)}")
        (batch,) = batch_sizes
        terms: dict[str, PerSampleTerm] = {}
        for module, name in self._layers.items():
            records = self._records.get(module, [])
            if len(records) > 1:
                raise RuntimeError(
                    f"layer {name!r} ran {len(records)} times in one training step (shared weights or several "
                    "forwards before the backward): book-keeping needs one call per layer, use per-sample "
                    'gradients "vmap"'
                )
            prefix = f"{name}." if name else ""
            if not records or records[0].output_grad is None:  # the layer did not reach the loss: zero gradients
                for local, p in module.named_parameters(recurse=False):
                    if p.requires_grad:
                        zeros = torch.zeros(batch, device=p.device, dtype=p.dtype)
                        terms[prefix + local] = PerSampleTerm(
                            zeros, lambda weights, p=p: weights.new_zeros(len(weights), *p.shape)
                        )
                continue
            (record,) = records
            local_masks = {local: masks[prefix + local] for local in record.trainable if prefix + local in masks}
            layer_terms = _layer_terms(module, record.inputs, record.output_grad, record.trainable, local_masks)
            for local, term in layer_terms.items():
                terms[prefix + local] = term.scaled(batch)  # the loss is a batch mean
        return batch, terms

    def per_sample_norms(self) -> Tensor:
        """The global per-sample gradient norms ``(B,)`` over all trainable parameters of the recorded step."""
        _, terms = self.terms()
        return torch.stack([term.squared_norms for term in terms.values()]).sum(0).sqrt()


@dataclass
class _Record:
    """One layer call of the recorded training step: its input, the parameters it trained, its output gradient."""

    inputs: Tensor
    trainable: dict[str, nn.Parameter]
    output_grad: Tensor | None = None


def vmap_per_sample_gradients(
    model: nn.Module,
    loss: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (n, *param.shape)}`` of ``model``'s trainable parameters (``torch.func``).

    Sample ``i``'s gradient is that of ``loss(model(inputs[i:i+1]), targets[i:i+1])``, computed by
    ``vmap(grad(...))`` over one-sample batches with ``functional_call`` on the trainable parameters (buffers as they
    are); randomness (dropout) is drawn independently per sample. ``chunk_size`` samples are vectorized at once
    (bounding the memory of the per-sample gradients); all at once when ``None``. Any layer type is supported.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        outputs = functional_call(model, params, (x.unsqueeze(0),), strict=False)
        return loss(outputs, y.unsqueeze(0))

    per_sample = vmap(
        grad(sample_loss),
        in_dims=(None, 0, 0),
        randomness="different",
        chunk_size=chunk_size,
    )
    return per_sample(params, inputs, targets)
