"""A downstream classifier with an argument named like a secret (a token for a remote evaluation service)."""

from __future__ import annotations

from torch import nn

from lit_methods import ImageClassifier


class RemoteEvalClassifier(ImageClassifier):
    """An :class:`~lit_methods.ImageClassifier` whose ``service_token`` must never be written by a run."""

    def __init__(self, backbone: nn.Module, service_token: str = "", **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.service_token = service_token
