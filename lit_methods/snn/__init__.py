"""Spiking neural networks: surrogate-gradient neurons and IIR-SNN's reduction to one timestep."""
