"""Selfie (Trinh, Luong, Le, "Selfie: Self-supervised Pretraining for Image Embedding",
https://arxiv.org/abs/1906.02940): masked-patch selection with a convolutional patch network and attention pooling."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.datamodules.batch import as_batch
from lit_methods.ssl.base import SSLMethod

__all__ = ["AttentionPooling", "Selfie"]


def _at_positions(features: Tensor, positions: Tensor) -> Tensor:
    """``features[n, positions[n, j]]`` for features ``(N, P, D)`` and positions ``(N, J)``: ``(N, J, D)``."""
    return features.gather(1, positions[..., None].expand(-1, -1, features.shape[-1]))


class AttentionPooling(nn.Module):
    """Selfie's attention pooling network: Transformer encoder layers over a learned start token followed by the
    visible patches' features plus their position embeddings; the output at the start token is the summary ``u``.

    Args:
        width: feature width (the patch network's ``num_features``).
        num_positions: grid positions (one learned embedding each, also used by the queries of the masked patches).
        num_layers: Transformer layers.
        num_heads: attention heads; must divide ``width``.
        feedforward_dim: hidden width of the Transformer MLP (default ``4 * width``).
        dropout: dropout inside the Transformer layers.
    """

    def __init__(
        self,
        width: int,
        num_positions: int,
        num_layers: int,
        num_heads: int,
        feedforward_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.start_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(num_positions, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, feedforward_dim or 4 * width, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, visible_features: Tensor, visible_positions: Tensor) -> Tensor:
        tokens = visible_features + self.position_embedding[visible_positions]
        start = self.start_token.expand(len(tokens), -1, -1)
        return self.encoder(torch.cat([start, tokens], dim=1))[:, 0]


class Selfie(SSLMethod):
    """Selfie pre-training: the image is cut into a grid of non-overlapping patches and every patch is embedded by the
    patch network (the backbone) into ``h_i``. A random set of ``num_masked`` positions is hidden; a Transformer
    encoder (the attention pooling network) reads a learned start token followed by the visible patches' ``h_i`` plus
    their position embeddings, and its output at the start token is the summary ``u``. For each masked position
    ``j`` the query ``u + pos_j`` scores every masked patch by the dot product ``<u + pos_j, h_k>``; the loss is the
    cross-entropy of choosing the patch that was at ``j`` among the image's masked patches (the distractors come
    from the same image). Masked patches never enter the pooling network; the patch network is trained through both
    sides. Fine-tuning reuses the patch network's weights on whole images
    (:class:`lit_methods.supervised.SelfieFineTuner`).

    Why :class:`SSLMethod`: Selfie reuses its backbone contract, optimizer wiring and online monitors, but it
    consumes single images, so it replaces ``training_step`` (batches ``(images, labels)``, a datamodule with
    ``ssl_views=0``) and does not use ``ssl_loss``. The monitors' representation (``forward``) is the mean of the
    patch features over the grid, defined for any patch network.

    Deviations (no official code was released): the paper's patch network is the first three residual stages of a
    ResNet-50; here it is any :mod:`lit_methods.nets` backbone applied to patches (e.g. a whole CIFAR ResNet, whose
    global pooling accepts 8x8 patches). Position embeddings are one learned vector per grid position. In training
    mode a BatchNorm patch network normalizes with statistics over all patches of the batch, masked ones included
    (as a ResNet patch network does in the paper); only these batch statistics connect patches.

    Args:
        backbone: the patch network: a :mod:`lit_methods.nets` backbone that accepts ``patch_size`` x ``patch_size``
            inputs; its ``num_features`` is the width of the attention pooling network.
        image_size: input height and width (filled from the datamodule by the CLI).
        patch_size: side of the square patches (8 for 32x32 CIFAR images and 32 for 224x224 in the paper); must
            divide both image sides.
        num_masked: masked patches per image (the candidates of each choice; chance accuracy is 1 / num_masked).
        num_attention_layers: Transformer layers of the attention pooling network.
        num_heads: attention heads; must divide the patch network's ``num_features``.
        feedforward_dim: hidden width of the Transformer MLP (default 4 x ``num_features``).
        dropout: dropout inside the Transformer layers.
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "selfie"

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 8,
        num_masked: int = 4,
        num_attention_layers: int = 3,
        num_heads: int = 8,
        feedforward_dim: int | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(f"patch_size {patch_size} must be >= 1 and divide the image size {height}x{width}")
        self.grid = (height // patch_size, width // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        if not 2 <= num_masked < self.num_patches:
            raise ValueError(
                f"num_masked must lie in [2, {self.num_patches}) for {self.num_patches} patches, got {num_masked}"
            )
        if num_attention_layers < 1:
            raise ValueError(f"num_attention_layers must be >= 1, got {num_attention_layers}")
        if num_heads < 1 or self.num_features % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the patch features' width {self.num_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.image_size = (height, width)
        self.patch_size = patch_size
        self.num_masked = num_masked
        self.attention_pooling = AttentionPooling(
            self.num_features, self.num_patches, num_attention_layers, num_heads, feedforward_dim, dropout
        )

    # -- the pieces of the objective -----------------------------------------------------------------------------
    def patchify(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, num_patches, C, patch_size, patch_size)``, grid positions in row-major order."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"expected {self.image_size[0]}x{self.image_size[1]} images, got {tuple(images.shape)}")
        p = self.patch_size
        n, c = images.shape[:2]
        patches = images.unfold(2, p, p).unfold(3, p, p)  # (N, C, rows, cols, p, p)
        return patches.permute(0, 2, 3, 1, 4, 5).reshape(n, self.num_patches, c, p, p)

    def patch_features(self, images: Tensor) -> Tensor:
        """The patch network's features of every patch, ``(N, num_patches, num_features)``."""
        patches = self.patchify(self.normalize_inputs(images))
        n = len(patches)
        features = self.backbone.forward_features(patches.flatten(0, 1))
        return features.view(n, self.num_patches, -1)

    def sample_mask(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per image, a uniformly random set of masked positions ``(N, num_masked)`` and the visible rest."""
        order = torch.rand(batch_size, self.num_patches, device=device).argsort(dim=1)
        return order[:, : self.num_masked], order[:, self.num_masked :]

    def patch_choice_logits(self, summary: Tensor, masked_positions: Tensor, masked_features: Tensor) -> Tensor:
        """``logits[n, j, k] = <u_n + pos(masked_positions[n, j]), masked_features[n, k]>``, ``(N, M, M)``."""
        queries = summary[:, None, :] + self.attention_pooling.position_embedding[masked_positions]
        return queries @ masked_features.transpose(1, 2)

    def selfie_loss(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, patch-choice accuracy, patch features)`` for a batch of images, with a fresh random mask."""
        features = self.patch_features(images)
        masked, visible = self.sample_mask(len(images), images.device)
        summary = self.attention_pooling(_at_positions(features, visible), visible)
        logits = self.patch_choice_logits(summary, masked, _at_positions(features, masked))
        targets = torch.arange(self.num_masked, device=images.device).expand(len(images), -1)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = (logits.argmax(dim=2) == targets).float().mean()
        return loss, accuracy, features

    # -- Lightning ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The monitors' representation: the patch features averaged over the grid."""
        return self.patch_features(x).mean(dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        if "views" in batch:
            raise TypeError("Selfie trains on single images, not multi-view batches: set the datamodule's ssl_views=0")
        images, targets = batch["inputs"], batch["targets"]
        if isinstance(images, (list, tuple)):
            raise TypeError("Selfie trains on single images, not multi-view batches: set the datamodule's ssl_views=0")
        loss, accuracy, features = self.selfie_loss(images)
        representation = features.mean(dim=1)
        probe_loss, _ = self.probe(representation, targets)
        self.knn.update(bank_features=representation, bank_targets=targets)
        self.log_dict({"train/ssl_loss": loss, "train/patch_acc": accuracy, "train/probe_loss": probe_loss}, on_step=True)
        return loss + probe_loss
