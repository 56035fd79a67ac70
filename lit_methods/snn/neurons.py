"""The leaky integrate-and-fire neuron of DIET-SNN / IIR-SNN with its piecewise-linear surrogate gradient and a
spiking VGG-style network built from it (Chowdhury, Rathi & Roy, "One Timestep is All You Need: Training Spiking
Neural Networks with Ultra Low Latency", arXiv:2110.05929; Rathi & Roy, DIET-SNN, arXiv:2008.03658)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IIRNeuron", "SpikingVGG", "spike_with_surrogate"]


class _SpikeFunction(torch.autograd.Function):
    """Heaviside of the normalized membrane ``v = u / theta - 1`` forward; ``gamma * max(0, 1 - |v|)`` backward."""

    @staticmethod
    def forward(ctx: Any, normalized_membrane: Tensor, gamma: float) -> Tensor:
        ctx.save_for_backward(normalized_membrane)
        ctx.gamma = gamma
        return (normalized_membrane >= 0).to(normalized_membrane.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        (normalized_membrane,) = ctx.saved_tensors
        surrogate = ctx.gamma * (1.0 - normalized_membrane.abs()).clamp(min=0.0)
        return grad_output * surrogate, None


def spike_with_surrogate(normalized_membrane: Tensor, gamma: float = 0.3) -> Tensor:
    """Binary spikes ``H(v)`` of ``v = u / theta - 1`` (a spike where ``v >= 0``, as spikingjelly's heaviside) whose
    gradient is the piecewise-linear surrogate ``gamma * max(0, 1 - |v|)`` (IIR-SNN code: gamma = 0.3)."""
    return _SpikeFunction.apply(normalized_membrane, gamma)


class IIRNeuron(nn.Module):
    """A layer of leaky integrate-and-fire neurons with a learnable threshold ``theta`` and leak ``lambda`` (scalars
    per layer) and soft reset, as in IIR-SNN's official ``vgg_spiking_bnfused`` model.

    One step: ``u <- lambda * u + I``; ``s = H(u / theta - 1)``; ``u <- u - theta * s``. With ``lambda = 1`` this is
    spikingjelly's ``IFNode(v_threshold=theta, v_reset=None)`` (soft reset). ``lambda`` is kept <= 1 by
    :meth:`clamp_leak`, which the training module calls after every optimizer step.

    Args:
        threshold: initial firing threshold theta (> 0).
        leak: initial leak lambda (official: 1.0).
        gamma: scale of the surrogate gradient (official: 0.3).
    """

    def __init__(self, threshold: float = 1.0, leak: float = 1.0, gamma: float = 0.3) -> None:
        super().__init__()
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0 < leak <= 1:
            raise ValueError(f"leak must lie in (0, 1], got {leak}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.leak = nn.Parameter(torch.tensor(float(leak)))
        self.gamma = gamma

    def step(self, current: Tensor, membrane: Tensor) -> tuple[Tensor, Tensor]:
        """One timestep: returns ``(spikes, membrane after the soft reset)``."""
        membrane = self.leak * membrane + current
        spikes = spike_with_surrogate(membrane / self.threshold - 1.0, self.gamma)
        return spikes, membrane - self.threshold * spikes

    @torch.no_grad()
    def clamp_leak(self) -> None:
        """Keep ``lambda <= 1`` (the official code clamps it after every step)."""
        self.leak.clamp_(max=1.0)


class SpikingVGG(nn.Module):
    """A VGG-style spiking network with direct input encoding: the image enters the first conv at every timestep.

    ``features`` lists conv widths (3x3, padding 1, no bias, no BN: the official path folds BN into the weights) and
    ``"M"`` for 2x2 average pooling of the spikes; ``hidden_features`` lists spiking fully connected layers; the last
    linear layer only integrates, and the logits are its membrane averaged over the timesteps. Dropout draws one mask
    per forward pass and reuses it at every timestep (official code). :attr:`timesteps` is set by the training
    module (IIR's schedule); :attr:`last_firing_rates` holds each spiking layer's mean spike rate of the last forward.

    Args:
        num_classes: outputs of the integrating classifier.
        in_channels: image channels.
        image_size: input height and width.
        features: conv widths and ``"M"`` poolings (VGG16: 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M).
        hidden_features: widths of the spiking fully connected layers before the classifier.
        dropout: dropout probability in front of every fully connected layer (official: 0.2).
        threshold: initial threshold of every neuron layer.
        leak: initial leak of every neuron layer.
        gamma: surrogate gradient scale.
        timesteps: timesteps of a forward pass (>= 1).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        features: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                         512, 512, 512, "M"),
        hidden_features: Sequence[int] = (4096, 4096),
        dropout: float = 0.2,
        threshold: float = 1.0,
        leak: float = 1.0,
        gamma: float = 0.3,
        timesteps: int = 5,
    ) -> None:
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.timesteps = timesteps
        self.dropout = dropout
        layers: list[nn.Module] = []
        neurons: list[nn.Module] = []
        channels = in_channels
        for spec in features:
            if spec == "M":
                if height < 2 or width < 2:
                    raise ValueError(f"features {list(features)} pool a {image_size} image below 1x1")
                layers.append(nn.AvgPool2d(2))
                height, width = height // 2, width // 2
            elif isinstance(spec, int) and spec >= 1:
                layers.append(nn.Conv2d(channels, spec, 3, padding=1, bias=False))
                neurons.append(IIRNeuron(threshold, leak, gamma))
                channels = spec
            else:
                raise ValueError(f"features entries are widths >= 1 or 'M', got {spec!r}")
        self.conv_layers = nn.ModuleList(layers)
        flat = channels * height * width
        self.linear_layers = nn.ModuleList()
        for hidden in hidden_features:
            self.linear_layers.append(nn.Linear(flat, hidden, bias=False))
            neurons.append(IIRNeuron(threshold, leak, gamma))
            flat = hidden
        self.classifier = nn.Linear(flat, num_classes, bias=False)
        self.neurons = nn.ModuleList(neurons)
        self.last_firing_rates: list[float] = []

    @property
    def timesteps(self) -> int:
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"timesteps must be an integer >= 1, got {value!r}")
        self._timesteps = value

    def _dropout_mask(self, like: Tensor) -> Tensor | None:
        if not self.training or self.dropout == 0:
            return None
        return torch.bernoulli(torch.full_like(like, 1 - self.dropout)) / (1 - self.dropout)

    def forward(self, x: Tensor) -> Tensor:
        membranes: list[Tensor | float] = [0.0] * len(self.neurons)
        spike_counts = [x.new_zeros(()) for _ in self.neurons]
        logits: Tensor | float = 0.0
        masks: list[Tensor | None] = []
        for t in range(self.timesteps):
            h, index = x, 0
            for layer in self.conv_layers:
                if isinstance(layer, nn.AvgPool2d):
                    h = layer(h)
                    continue
                h, membranes[index] = self.neurons[index].step(layer(h), membranes[index])
                spike_counts[index] = spike_counts[index] + h.detach().mean()
                index += 1
            h = h.flatten(1)
            for position, layer in enumerate([*self.linear_layers, self.classifier]):
                if t == 0:
                    masks.append(self._dropout_mask(h))
                if masks[position] is not None:
                    h = h * masks[position]
                current = layer(h)
                if layer is self.classifier:
                    logits = logits + current
                    break
                h, membranes[index] = self.neurons[index].step(current, membranes[index])
                spike_counts[index] = spike_counts[index] + h.detach().mean()
                index += 1
        self.last_firing_rates = [float(count) / self.timesteps for count in spike_counts]
        return logits / self.timesteps

    def clamp_leaks(self) -> None:
        for neuron in self.neurons:
            neuron.clamp_leak()
