"""Spiking neural networks: surrogate-gradient neurons and IIR-SNN's reduction to one timestep."""

from lit_methods.snn.iir_snn import IIRSNN
from lit_methods.snn.neurons import IIRNeuron, SpikingVGG, spike_with_surrogate

__all__ = ["IIRNeuron", "IIRSNN", "SpikingVGG", "spike_with_surrogate"]
