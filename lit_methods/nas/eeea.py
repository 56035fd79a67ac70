"""EEEA-Net's search space and evolution (Termritthikun et al., EAAI 2021, arXiv:2108.06156): a DARTS-style cell
genome, the cell network it builds, NSGA-II sorting and crowding, Early-Exit Population Initialisation, the genetic
operators, and :class:`EEEANet`, the LightningModule that trains a found architecture.

The search loop that calls a Lightning fit per candidate is :mod:`lit_methods.nas.eeea_search`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier

__all__ = [
    "OPERATIONS",
    "CellNetwork",
    "EEEANet",
    "crossover",
    "crowding_distance",
    "early_exit_population",
    "genome_hash",
    "inversion",
    "mutation",
    "non_dominated_sort",
    "parameter_megabytes",
    "random_genome",
    "validate_genome",
]

#: the DARTS operations of the search list (EEEA's inverted-residual variants are not included)
OPERATIONS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
              "dil_conv_5x5")

Genome = dict[str, list[list[Any]]]  # {"normal": [[in1, op1, in2, op2] per block], "reduce": [...]}


# -- genome ----------------------------------------------------------------------------------------------------------
def validate_genome(genome: Genome, blocks: int | None = None) -> None:
    """``ValueError`` unless both cells have the same number of blocks and block ``b`` reads inputs ``< b + 2`` (the
    two previous cells, then earlier blocks) with known operations."""
    if set(genome) != {"normal", "reduce"}:
        raise ValueError(f"a genome has a 'normal' and a 'reduce' cell, got keys {sorted(genome)}")
    for cell in ("normal", "reduce"):
        cell_blocks = genome[cell]
        if not cell_blocks or (blocks is not None and len(cell_blocks) != blocks):
            raise ValueError(f"the {cell} cell needs {blocks or '>= 1'} blocks, got {len(cell_blocks)}")
        for b, gene in enumerate(cell_blocks):
            if len(gene) != 4:
                raise ValueError(f"{cell} block {b} must be [input, op, input, op], got {gene}")
            for index, op in ((gene[0], gene[1]), (gene[2], gene[3])):
                if not (isinstance(index, int) and 0 <= index < b + 2):
                    raise ValueError(f"{cell} block {b} reads input {index!r}; allowed 0..{b + 1}")
                if op not in OPERATIONS:
                    raise ValueError(f"{cell} block {b} has unknown operation {op!r}; known {OPERATIONS}")


def genome_hash(genome: Genome) -> str:
    """md5 of the genome's canonical JSON (sorted keys): its identity for deduplication and the fitness cache."""
    return hashlib.md5(json.dumps(genome, sort_keys=True).encode()).hexdigest()


def random_genome(rng: random.Random, blocks: int) -> Genome:
    return {
        cell: [[rng.randrange(b + 2), rng.choice(OPERATIONS), rng.randrange(b + 2), rng.choice(OPERATIONS)]
               for b in range(blocks)]
        for cell in ("normal", "reduce")
    }


def _genes(genome: Genome) -> list[tuple[str, int, int]]:
    """(cell, block, pair) of every (input, op) gene pair."""
    return [(cell, b, pair) for cell in ("normal", "reduce") for b in range(len(genome[cell])) for pair in (0, 1)]


def crossover(first: Genome, second: Genome, rng: random.Random) -> tuple[Genome, Genome]:
    """Uniform crossover over (input, op) gene pairs; both children stay valid (a pair keeps its block)."""
    a, b = json.loads(json.dumps(first)), json.loads(json.dumps(second))
    for cell, block, pair in _genes(first):
        if rng.random() < 0.5:
            s = slice(2 * pair, 2 * pair + 2)
            a[cell][block][s], b[cell][block][s] = b[cell][block][s], a[cell][block][s]
    return a, b


def mutation(genome: Genome, rng: random.Random, probability: float) -> Genome:
    """With ``probability``, re-sample one (input, op) gene pair within its block's allowed inputs."""
    child = json.loads(json.dumps(genome))
    if rng.random() < probability:
        cell, block, pair = rng.choice(_genes(child))
        child[cell][block][2 * pair : 2 * pair + 2] = [rng.randrange(block + 2), rng.choice(OPERATIONS)]
    return child


def inversion(genome: Genome, rng: random.Random, probability: float) -> Genome:
    """With ``probability``, swap the operations of two adjacent gene pairs of one cell (inputs stay in place, so
    no block reads a later one)."""
    child = json.loads(json.dumps(genome))
    if rng.random() < probability:
        cell = rng.choice(("normal", "reduce"))
        pairs = [(b, p) for b in range(len(child[cell])) for p in (0, 1)]
        if len(pairs) >= 2:
            i = rng.randrange(len(pairs) - 1)
            (b1, p1), (b2, p2) = pairs[i], pairs[i + 1]
            child[cell][b1][2 * p1 + 1], child[cell][b2][2 * p2 + 1] = (
                child[cell][b2][2 * p2 + 1], child[cell][b1][2 * p1 + 1])
    return child


# -- NSGA-II ----------------------------------------------------------------------------------------------------------
def non_dominated_sort(objectives: np.ndarray) -> list[list[int]]:
    """Fronts of row indices of ``objectives`` (N, M), all minimised: front 0 is dominated by no row (Deb et al.
    2002's fast non-dominated sort)."""
    n = len(objectives)
    dominated_by: list[list[int]] = [[] for _ in range(n)]
    counts = np.zeros(n, dtype=int)
    for i in range(n):
        for j in range(n):
            if i != j and np.all(objectives[i] <= objectives[j]) and np.any(objectives[i] < objectives[j]):
                dominated_by[i].append(j)
                counts[j] += 1
    fronts, current = [], [i for i in range(n) if counts[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in dominated_by[i]:
                counts[j] -= 1
                if counts[j] == 0:
                    following.append(j)
        current = sorted(following)
    return fronts


def crowding_distance(objectives: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of the rows of one front: per objective, the gap between a row's neighbours
    normalised by the objective's range, averaged over objectives (as pymoo, a constant factor off Deb et al.'s sum);
    the extremes of every objective get infinity."""
    n, m = objectives.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(objectives[:, k], kind="stable")
        values = objectives[order, k]
        span = values[-1] - values[0]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (values[2:] - values[:-2]) / span
    return distance / m


def rank_and_crowding(objectives: np.ndarray) -> list[int]:
    """Row indices ordered by NSGA-II survival: front rank, then larger crowding distance."""
    order = []
    for front in non_dominated_sort(objectives):
        crowd = crowding_distance(objectives[front])
        order += [front[i] for i in np.argsort(-crowd, kind="stable")]
    return order


# -- the cell network ------------------------------------------------------------------------------------------------
class _ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> None:
        super().__init__(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=False),
                         nn.BatchNorm2d(c_out))


class _DilConv(nn.Sequential):
    def __init__(self, c: int, kernel: int, stride: int, padding: int, dilation: int) -> None:
        super().__init__(nn.ReLU(), nn.Conv2d(c, c, kernel, stride, padding, dilation, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


class _SepConv(nn.Sequential):
    def __init__(self, c: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__(_DilConv(c, kernel, stride, padding, 1), _DilConv(c, kernel, 1, padding, 1))


class _FactorizedReduce(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(x)
        shifted = nn.functional.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def _operation(name: str, c: int, stride: int) -> nn.Module:
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else _FactorizedReduce(c, c)
    if name.startswith("sep_conv"):
        kernel = int(name[-1])
        return _SepConv(c, kernel, stride, kernel // 2)
    kernel = int(name[-1])
    return _DilConv(c, kernel, stride, kernel - 1, 2)


class _Cell(nn.Module):
    def __init__(self, blocks: list[list[Any]], c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.pre0 = _FactorizedReduce(c_pp, c) if reduction_prev else _ReLUConvBN(c_pp, c, 1, 1, 0)
        self.pre1 = _ReLUConvBN(c_p, c, 1, 1, 0)
        self.blocks = blocks
        self.ops = nn.ModuleList()
        for in1, op1, in2, op2 in blocks:
            for index, op in ((in1, op1), (in2, op2)):
                self.ops.append(_operation(op, c, 2 if reduction and index < 2 else 1))
        self.multiplier = len(blocks)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for b, (in1, _, in2, _) in enumerate(self.blocks):
            total = 0
            for k, index in enumerate((in1, in2)):
                op = self.ops[2 * b + k]
                h = op(states[index])
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    keep = 1 - drop_prob
                    h = h * torch.bernoulli(h.new_full((h.shape[0], 1, 1, 1), keep)) / keep
                total = total + h
            states.append(total)
        return torch.cat(states[2:], dim=1)


class CellNetwork(nn.Module):
    """The DARTS-style network of a genome: a 3x3 conv stem (``3 * channels``), ``layers`` cells with reduction cells
    (stride 2, channels doubled) at one and two thirds of the depth, global pooling and a linear classifier. Each cell
    concatenates the outputs of all its blocks (a simplification of DARTS' concatenation of unused nodes).
    Drop-path (``drop_path_prob``, set by :class:`EEEANet` per epoch) drops whole non-identity edges per sample.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        genome: ``{"normal": [[in1, op1, in2, op2], ...], "reduce": [...]}`` (see :func:`validate_genome`).
        layers: number of cells (EEEA search: 8, evaluation: 20).
        channels: initial channels (search 16, evaluation 36).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, genome: Genome | None = None, layers: int = 8,
                 channels: int = 16) -> None:
        super().__init__()
        if genome is None:
            raise ValueError("CellNetwork needs a genome (e.g. from the search's results table)")
        validate_genome(genome)
        if layers < 1 or channels < 2:
            raise ValueError(f"need layers >= 1 and channels >= 2, got layers={layers}, channels={channels}")
        self.num_classes = num_classes
        self.drop_path_prob = 0.0
        stem = 3 * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem))
        c_pp, c_p, c = stem, stem, channels
        reductions = {layers // 3, 2 * layers // 3} if layers >= 3 else set()
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c *= 2
            cell = _Cell(genome["reduce" if reduction else "normal"], c_pp, c_p, c, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c
        self.fc = nn.Linear(c_p, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
        return self.fc(s1.mean(dim=(2, 3)))


def parameter_megabytes(genome: Genome, num_classes: int, layers: int, channels: int, in_channels: int = 3) -> float:
    """Millions of parameters of the genome's network at the given size, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = CellNetwork(num_classes, in_channels, genome, layers, channels)
    return sum(p.numel() for p in net.parameters()) / 1e6


def early_exit_population(
    size: int,
    blocks: int,
    rng: random.Random,
    params_of: Callable[[Genome], float],
    max_params: float | None,
    max_draws: int = 10_000,
) -> tuple[list[Genome], int]:
    """EE-PI: draw random genomes, re-drawing any whose ``params_of`` is >= ``max_params`` (beta, in millions of
    parameters; ``None`` disables the early exit) or that repeats one already drawn. Returns the population and the
    number of rejections for size; ``ValueError`` when ``max_draws`` draws do not fill the population."""
    population: list[Genome] = []
    seen: set[str] = set()
    rejected = 0
    for _ in range(max_draws):
        if len(population) == size:
            return population, rejected
        genome = random_genome(rng, blocks)
        key = genome_hash(genome)
        if key in seen:
            continue
        seen.add(key)
        if max_params is not None and params_of(genome) >= max_params:
            rejected += 1
            continue
        population.append(genome)
    if len(population) == size:
        return population, rejected
    raise ValueError(
        f"early-exit initialisation found {len(population)} of {size} genomes under max_params={max_params} in "
        f"{max_draws} draws: the search space has (almost) no valid architecture for this beta; raise it"
    )


class EEEANet(ImageClassifier):
    """Trains a found EEEA-Net architecture: an :class:`~lit_methods.ImageClassifier` whose backbone is a
    :class:`CellNetwork`, with DARTS' drop-path rate rising linearly over the epochs to ``drop_path_prob``.
    Gradient clipping (DARTS/EEEA: 5) is the trainer's ``gradient_clip_val``.

    Args:
        backbone: a :class:`CellNetwork`.
        drop_path_prob: final drop-path rate (EEEA search 0.2; DARTS retraining 0.2).
        **kwargs: :class:`~lit_methods.ImageClassifier`'s.
    """

    slug: ClassVar[str] = "eeea-net"

    def __init__(self, backbone: CellNetwork, drop_path_prob: float = 0.2, **kwargs: Any) -> None:
        if not isinstance(backbone, CellNetwork):
            raise ValueError(f"EEEANet trains a lit_methods.nas.CellNetwork, got {type(backbone).__name__}")
        if not 0 <= drop_path_prob < 1:
            raise ValueError(f"drop_path_prob must lie in [0, 1), got {drop_path_prob}")
        super().__init__(backbone, **kwargs)
        self.drop_path_prob = drop_path_prob

    def on_train_epoch_start(self) -> None:
        epochs = self.trainer.max_epochs
        fraction = self.current_epoch / epochs if epochs and epochs > 0 else 1.0
        self.backbone.drop_path_prob = self.drop_path_prob * min(1.0, fraction)

