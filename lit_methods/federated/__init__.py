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
from lit_methods.federated.fedossl import FedoSSL, calibrate_centroids, cluster_accuracy, sinkhorn
from lit_methods.federated.fedloge import FedLoGe, gla_fr_realign, sparse_equiangular_classifier

__all__ = [
    "ClientResult",
    "FedLoGe",
    "FederatedMethod",
    "FedoSSL",
    "Federation",
    "FederationState",
    "calibrate_centroids",
    "client_update",
    "cluster_accuracy",
    "fedavg",
    "gla_fr_realign",
    "server_update",
    "sinkhorn",
    "sparse_equiangular_classifier",
]
