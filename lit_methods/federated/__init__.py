"""Federated learning: client updates and server aggregations as plain functions, run in process or on Flower."""

from lit_methods.federated.core import (
    ClientResult,
    FederatedMethod,
    Federation,
    FederationState,
    client_update,
    fedavg,
    server_update,
)
from lit_methods.federated.fedloge import FedLoGe, gla_fr_realign, sparse_equiangular_classifier

__all__ = [
    "ClientResult",
    "FedLoGe",
    "FederatedMethod",
    "Federation",
    "FederationState",
    "client_update",
    "fedavg",
    "gla_fr_realign",
    "server_update",
    "sparse_equiangular_classifier",
]
