"""Coupled channel groups and physical export of structurally pruned networks, on torch-pruning's dependency graph.

Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023, https://arxiv.org/abs/2301.12900 (the
``torch-pruning`` library): a *group* is every slice of every layer that must be removed together when one channel
of a root layer goes (a conv's filters, its BN entries, the partners of a residual add, the consumers' input
slices). Here a group is described by its *out-side* parameter slices (:class:`ChannelGroup`): the slices that
produce the group's channels. When every out-side slice of a channel is zero, the channel's output is exactly zero
and the consumers do not depend on it (a zero-invariant group, OTOv2's ZIG), so removing it changes no output.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "ChannelGroup",
    "build_dependency_graph",
    "channel_groups",
    "count_parameters",
    "export_pruned",
]

PRUNABLE_ROOTS = (nn.Conv2d, nn.Linear)
OUT_SIDE_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass
class ChannelGroup:
    """One set of coupled channels (a torch-pruning group) of a network.

    Args:
        root: name of the group's root layer (as in ``model.named_modules()``).
        num_channels: number of coupled channels (the root's output channels).
        out_slices: ``(parameter name, channel indices)`` pairs: for channel ``k`` of the group, entry ``k`` of the
            indices along dim 0 of the parameter belongs to it (convolution/linear weights and biases, BN weights
            and biases of every producer of these channels).
        norms: names of the batch-norm layers among the producers (where a channel gate sits).
        layers: names of every conv/linear/BN layer the group touches (producers and consumers).
    """

    root: str
    num_channels: int
    out_slices: list[tuple[str, Tensor]] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)

    def channel_norms(self, params: Mapping[str, Tensor]) -> Tensor:
        """L2 norm of each channel over all its out-side slices (``params``: ``dict(model.named_parameters())``)."""
        squares = torch.zeros(self.num_channels, device=next(iter(params.values())).device)
        for name, idxs in self.out_slices:
            param = params[name].detach()
            squares += param.index_select(0, idxs.to(param.device)).pow(2).reshape(len(idxs), -1).sum(1)
        return squares.sqrt()


def build_dependency_graph(model: nn.Module, example_inputs: Tensor):  # noqa: ANN201 (torch_pruning type)
    """torch-pruning's dependency graph of ``model``; a ``ValueError`` naming the model when it cannot be traced."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    cannot = f"torch-pruning cannot trace {type(model).__name__} on inputs of shape {tuple(example_inputs.shape)}"
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as error:  # tracing failures surface as many exception types
        raise ValueError(f"{cannot}: {type(error).__name__}: {error}") from error
    finally:
        model.train(was_training)
    unreached = [
        name for name, module in model.named_modules() if isinstance(module, PRUNABLE_ROOTS) and module not in graph.module2node
    ]
    if unreached:
        raise ValueError(f"{cannot}: autograd does not reach the layers {unreached} from the output")
    return graph


def _resolve(model: nn.Module, names: Sequence[str], what: str) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"{what} names {missing}, which are not modules of {type(model).__name__}")
    return [modules[name] for name in names]


def channel_groups(
    model: nn.Module, example_inputs: Tensor, ignored_layers: Sequence[str] = (), graph=None  # noqa: ANN001
) -> list[ChannelGroup]:
    """The coupled channel groups of ``model``'s conv/linear layers, found by torch-pruning, in its order.

    ``ignored_layers`` (module names, e.g. the classifier ``"fc"``) are never roots: their outputs are kept. A
    ``ValueError`` names unknown layers or a model torch-pruning cannot trace.
    """
    ignored = _resolve(model, ignored_layers, "ignored_layers")
    graph = graph if graph is not None else build_dependency_graph(model, example_inputs)
    module_names = {module: name for name, module in model.named_modules()}
    param_names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE_ROOTS)):
        root_dep, root_idxs = group[0]
        found = ChannelGroup(module_names[root_dep.target.module], len(root_idxs))
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, OUT_SIDE_TYPES):
                continue
            name = module_names[module]
            if name not in found.layers:
                found.layers.append(name)
            if dep.handler.__name__ != "prune_out_channels":
                continue
            if len(idxs) != found.num_channels:
                raise ValueError(f"group of {found.root}: {name} has {len(idxs)} coupled channels, not {found.num_channels}")
            index = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
            for param in (module.weight, module.bias):
                if param is not None and (param_names[id(param)], index) not in found.out_slices:
                    found.out_slices.append((param_names[id(param)], index))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in found.norms:
                found.norms.append(name)
        groups.append(found)
    return groups


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters())


def export_pruned(
    model: nn.Module,
    example_inputs: Tensor,
    keep: Mapping[str, Tensor],
    ignored_layers: Sequence[str] = (),
) -> nn.Module:
    """A physically smaller copy of ``model`` without the channels that ``keep`` drops; ``model`` is unchanged.

    ``keep`` maps a group's root name (:func:`channel_groups`) to a boolean vector over its channels; groups not
    named keep every channel. A group dropping all its channels keeps its first one with every out-side slice set to
    zero (torch-pruning cannot remove a layer), so its output is zero as the dropped channels' would be. The removed
    channels must not influence the output (their out-side slices or gates are zero) for the copy to compute the same
    function; the caller checks that where it matters.
    """
    slim = copy.deepcopy(model)
    slim.eval()
    graph = build_dependency_graph(slim, example_inputs)
    groups = {group.root: group for group in channel_groups(slim, example_inputs, ignored_layers, graph)}
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ValueError(f"keep names {unknown}, which are not channel-group roots; roots: {sorted(groups)}")
    modules = dict(slim.named_modules())
    params = dict(slim.named_parameters())
    plans = []
    for root, mask in keep.items():
        group = groups[root]
        mask = mask.bool().cpu()
        if mask.shape != (group.num_channels,):
            raise ValueError(f"keep[{root!r}] has shape {tuple(mask.shape)}, the group has {group.num_channels} channels")
        if not mask.any():
            with torch.no_grad():
                for name, idxs in group.out_slices:
                    params[name][idxs[0]] = 0.0
            mask = mask.clone()
            mask[0] = True
        drop = [int(i) for i in (~mask).nonzero().flatten()]
        if drop:
            plans.append((modules[root], drop))
    # one root at a time: each prune renumbers the channels of that group only
    for root_module, drop in plans:
        pruner = graph.get_pruner_of_module(root_module)
        graph.get_pruning_group(root_module, pruner.prune_out_channels, idxs=drop).prune()
    return slim
