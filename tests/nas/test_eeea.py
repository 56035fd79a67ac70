"""EEEA-Net: the early-exit invariant, NSGA-II sorting and crowding against pymoo, valid genetic operators, exact
resume of the search loop, and a tiny end-to-end search on digits whose evaluations are Lightning fits."""

from __future__ import annotations

import csv
import json
import random
import statistics

import numpy as np
import pytest
import torch
import yaml
from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from lit_methods.nas.eeea import (
    CellNetwork,
    crossover,
    crowding_distance,
    early_exit_population,
    genome_hash,
    inversion,
    mutation,
    non_dominated_sort,
    parameter_megabytes,
    random_genome,
    validate_genome,
)
from lit_methods.nas.eeea_search import EEEASearch, build_parser, main


def params_of(genome) -> float:
    """Millions of parameters at 4 cells x 16 channels (the tests' evaluation size: few cells build fast)."""
    return parameter_megabytes(genome, num_classes=10, layers=4, channels=16, in_channels=1)


def test_early_exit_keeps_every_initial_genome_under_beta_and_rejects_some():
    """beta = the median parameter count of 50 random genomes: all 8 initial genomes are under it and at least one
    draw was rejected; without the early exit (beta None) some of the 8 exceed it."""
    rng = random.Random(0)
    beta = statistics.median(params_of(random_genome(rng, 4)) for _ in range(50))
    population, rejected = early_exit_population(8, 4, random.Random(1), params_of, beta)
    assert len(population) == 8 and len({genome_hash(g) for g in population}) == 8
    assert all(params_of(g) < beta for g in population) and rejected >= 1
    plain, none_rejected = early_exit_population(8, 4, random.Random(1), params_of, None)
    assert none_rejected == 0 and any(params_of(g) >= beta for g in plain)


def test_a_beta_no_architecture_meets_is_a_clear_error():
    with pytest.raises(ValueError, match="no valid architecture for this beta"):
        early_exit_population(4, 4, random.Random(0), params_of, 1e-6, max_draws=10)


@pytest.mark.parametrize("seed", [0, 1])
def test_non_dominated_sort_and_crowding_equal_pymoo(seed):
    """30 random 2-D points (seed 1 on a coarse grid, so with ties): the same fronts as pymoo's NonDominatedSorting
    and, within every front, the same crowding distances as pymoo's calc_crowding_distance."""
    points = np.random.default_rng(seed).random((30, 2))
    if seed == 1:
        points = np.round(points * 4) / 4 + np.arange(30)[:, None] * 1e-9  # near-ties without exact duplicates
    ours = non_dominated_sort(points)
    reference = NonDominatedSorting().do(points)
    assert [sorted(front) for front in ours] == [sorted(front.tolist()) for front in reference]
    for front in ours:
        if len(front) > 2:
            np.testing.assert_allclose(crowding_distance(points[front]), calc_crowding_distance(points[front]))


def test_crossover_mutation_and_inversion_give_valid_genomes():
    rng = random.Random(0)
    changed = 0
    for _ in range(200):
        a, b = random_genome(rng, 4), random_genome(rng, 4)
        for child in crossover(a, b, rng):
            mutated = inversion(mutation(child, rng, 1.0), rng, 1.0)
            validate_genome(mutated, blocks=4)
            changed += genome_hash(mutated) != genome_hash(child)
    assert changed > 300
    with pytest.raises(ValueError, match="reads input 3; allowed 0..1"):
        validate_genome({"normal": [[3, "skip_connect", 0, "skip_connect"]], "reduce": [[0, "skip_connect", 1, "max_pool_3x3"]]})


def fake_accuracy(genome) -> float:
    """A deterministic stand-in for a fit (accuracy from the genome's hash), to test the loop alone."""
    return int(genome_hash(genome)[:6], 16) / 16**6


def fake_params(self, genome) -> float:
    """A deterministic stand-in for the parameter count (from the genome's hash)."""
    return int(genome_hash(genome)[6:12], 16) / 16**6


class Interrupted(Exception):
    pass


def test_an_interrupted_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    """The search loop with stand-in fitness and size: stopped at the 9th evaluation (inside generation 1) and run
    again on the same out_dir, it ends with the same population and records as an uninterrupted search."""
    calls = {"n": 0}

    def evaluate(self, genome):
        calls["n"] += 1
        if calls["n"] == 9:
            raise Interrupted
        return fake_accuracy(genome)

    monkeypatch.setattr(EEEASearch, "evaluate", evaluate)
    monkeypatch.setattr(EEEASearch, "params_of", fake_params)
    from lit_methods.datamodules import DigitsDataModule

    def search(out_dir):
        return EEEASearch(DigitsDataModule(), out_dir=str(out_dir), population=6, generations=3, max_params=0.5,
                          verbose=False)

    with pytest.raises(Interrupted):
        search(tmp_path / "interrupted").run()
    resumed = search(tmp_path / "interrupted").run()
    reference = search(tmp_path / "reference").run()
    assert resumed["population"] == reference["population"]
    assert resumed["records"] == reference["records"]
    assert len(reference["records"]) == 6 + 3 * 4


@pytest.fixture(scope="module")
def digits_search(tmp_path_factory):
    """P = 6, G = 2 on digits through the runner's command line: 3-cell 4-channel candidates, one fit of 3 steps
    each (a smoke run: accuracies are near chance)."""
    torch.set_num_threads(1)
    out_dir = tmp_path_factory.mktemp("eeea")
    state = main([
        "--config", "experiments/eeea-net/search/eeea-net-search_digits.yaml",
        f"--search.out_dir={out_dir}", "--search.population=6", "--search.generations=2",
        "--search.max_params=0.1", "--search.eval_layers=4", "--search.search_channels=4", "--search.verbose=false",
        "--search.trainer={max_epochs: 1, limit_train_batches: 3, limit_val_batches: 1}",
    ])
    return state, out_dir


@pytest.mark.slow
def test_a_tiny_search_gives_distinct_valid_children_and_a_non_dominated_first_front(digits_search):
    state, out_dir = digits_search
    with open(out_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [sum(int(r["generation"]) == g for r in rows) for g in range(3)] == [6, 4, 4]
    assert len({r["hash"] for r in rows}) == len(rows) == 14  # every child differs from all earlier genomes
    assert len(state["population"]) == 6
    for row in rows:
        validate_genome(json.loads(row["genome"]), blocks=4)
        if row["generation"] == "0":  # the early exit bounds the initial population only (as the official code)
            assert float(row["params_mb"]) < 0.1
    objectives = np.array([[float(r["error"]), float(r["params_mb"])] for r in rows])
    first = [i for i, r in enumerate(rows) if r["front"] == "0"]
    assert first and sorted(first) == sorted(NonDominatedSorting().do(objectives)[0].tolist())
    assert (out_dir / "pareto.png").stat().st_size > 5_000


@pytest.mark.slow
def test_the_found_architecture_builds_from_the_written_config(digits_search):
    _, out_dir = digits_search
    found = yaml.safe_load((out_dir / "found_model.yaml").read_text())
    backbone = found["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "lit_methods.nas.CellNetwork"
    net = CellNetwork(num_classes=10, in_channels=1, **backbone["init_args"])
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["eeea-net-search_digits.yaml", "eeea-net-search_cifar10.yaml"])
def test_search_configs_parse(name):
    """The runner's configs (not `lit-methods fit` configs, so tests/test_cli.py leaves them out) parse."""
    config = build_parser().parse_args(["--config", f"experiments/eeea-net/search/{name}"])
    assert config.search.population >= 3 and config.data.class_path.startswith("lit_methods.datamodules.")
