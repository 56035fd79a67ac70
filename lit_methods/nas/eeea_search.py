"""The EEEA-Net search runner (Termritthikun et al., arXiv:2108.06156): early-exit population initialisation, then
NSGA-II generations whose every fitness evaluation is an ordinary Lightning fit of :class:`~lit_methods.nas.EEEANet`.

Run it as ``python -m lit_methods.nas.eeea_search --config experiments/eeea-net/eeea-net-search_digits.yaml``: a
search is many fits, not one, so it has its own entry point rather than a ``lit-methods fit`` config; its ``data``
block is the same as a fit config's. It writes to ``out_dir``:

* ``search_state.json``, after every evaluation: the generator state, the generation, the population, the children
  being evaluated and every evaluated genome (the fitness cache). Running again with the same ``out_dir`` resumes
  where it stopped, drawing exactly what the uninterrupted search would have;
* ``results.csv`` (genome hash, generation, parameters in millions at the evaluation size, accuracy, error, Pareto
  front rank, genome) and ``pareto.png`` (error against parameters, first front highlighted), after every generation;
* ``found_model.yaml``: a ``model:`` config of the first front's most accurate genome at the evaluation size; train it
  with ``lit-methods fit --config experiments/eeea-net/eeea-net_cellnet_cifar10.yaml --config <out_dir>/found_model.yaml``.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml

from lit_methods.nas.eeea import (
    CellNetwork,
    EEEANet,
    Genome,
    crossover,
    early_exit_population,
    genome_hash,
    inversion,
    mutation,
    non_dominated_sort,
    parameter_megabytes,
    rank_and_crowding,
)

__all__ = ["EEEASearch", "main"]

STATE_FILE = "search_state.json"


def _rng_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


class EEEASearch:
    """NSGA-II over cell genomes with EE-PI, objectives (100 - validation accuracy, millions of parameters at the
    evaluation size), both minimised.

    Args:
        datamodule: the data each candidate trains and validates on.
        out_dir: where the state, the table and the plot go (resumed from when it holds a state file).
        population: individuals per generation (official 40).
        generations: generations after the initial population (official 30).
        max_params: EE-PI's beta in millions of parameters at the evaluation size (official 5.0; ``None``: no
            early exit, the plain NSGA-Net initialisation).
        blocks: blocks per cell (official 4).
        search_layers, search_channels: the candidate's size when trained for fitness (official 8 cells, 16 channels).
        eval_layers, eval_channels: the size parameters are counted at (official 20 cells, 36 channels).
        retain: fraction of the population kept as parents (official 0.1; at least 2).
        mutation_prob, inversion_prob: operator probabilities (official 0.1 each).
        lr, momentum, weight_decay, drop_path_prob: the candidate's SGD (official 0.025, 0.9, 5e-4) and drop-path
            (0.2).
        trainer: keyword arguments of every candidate's ``lightning.Trainer`` (official: 1 epoch, gradient clip 5).
        seed: seed of the search's draws and of every candidate's fit.
        verbose: print a line per evaluation and per generation.
    """

    def __init__(
        self,
        datamodule: L.LightningDataModule,
        out_dir: str = "eeea_search",
        population: int = 40,
        generations: int = 30,
        max_params: float | None = 5.0,
        blocks: int = 4,
        search_layers: int = 8,
        search_channels: int = 16,
        eval_layers: int = 20,
        eval_channels: int = 36,
        retain: float = 0.1,
        mutation_prob: float = 0.1,
        inversion_prob: float = 0.1,
        lr: float = 0.025,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        drop_path_prob: float = 0.2,
        trainer: dict[str, Any] | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if population < 3:
            raise ValueError(f"population must be >= 3 (2 parents and a child), got {population}")
        if generations < 0 or blocks < 1:
            raise ValueError(f"need generations >= 0 and blocks >= 1, got {generations}, {blocks}")
        if max_params is not None and max_params <= 0:
            raise ValueError(f"max_params (beta) must be > 0 or None, got {max_params}")
        if not 0 < retain < 1:
            raise ValueError(f"retain must lie in (0, 1), got {retain}")
        for name, value in (("mutation_prob", mutation_prob), ("inversion_prob", inversion_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.datamodule = datamodule
        self.out_dir = Path(out_dir)
        self.population_size, self.generations, self.max_params, self.blocks = population, generations, max_params, blocks
        self.search_size, self.eval_size = (search_layers, search_channels), (eval_layers, eval_channels)
        self.parents = max(2, math.ceil(retain * population))
        if self.parents >= population:
            raise ValueError(f"retain={retain} keeps {self.parents} parents of {population}: no room for children")
        self.mutation_prob, self.inversion_prob = mutation_prob, inversion_prob
        self.optim = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self.drop_path_prob = drop_path_prob
        self.trainer_kwargs = {"max_epochs": 1, "gradient_clip_val": 5.0} | dict(trainer or {})
        self.seed, self.verbose = seed, verbose
        self.initial_rejections = 0

    # -- pieces -------------------------------------------------------------------------------------------------------
    def params_of(self, genome: Genome) -> float:
        dm = self.datamodule
        return parameter_megabytes(genome, dm.num_classes, *self.eval_size, in_channels=dm.in_channels)

    def evaluate(self, genome: Genome) -> float:
        """Validation accuracy of ``genome`` at the search size after one Lightning fit (seeded by its hash)."""
        key = genome_hash(genome)
        L.seed_everything(self.seed + int(key[:7], 16), verbose=False)
        dm = self.datamodule
        net = CellNetwork(dm.num_classes, dm.in_channels, genome, *self.search_size)
        module = EEEANet(net, drop_path_prob=self.drop_path_prob, nesterov=False, lr_schedule="cosine", **self.optim)
        options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
        trainer = L.Trainer(**(options | self.trainer_kwargs))
        trainer.fit(module, datamodule=dm)
        (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
        return float(metrics["val/acc"])

    def _survivors(self, keys: Sequence[str], records: dict[str, dict]) -> list[str]:
        objectives = np.array([[100 - 100 * records[k]["accuracy"], records[k]["params_mb"]] for k in keys])
        return [keys[i] for i in rank_and_crowding(objectives)]

    def _children(self, parents: list[str], records: dict[str, dict], rng: random.Random) -> list[Genome]:
        """Tournament selection by survival order, uniform crossover, mutation and inversion; children repeating
        any genome seen so far are rejected."""
        seen = set(records)
        children: list[Genome] = []
        tournament = max(2, len(parents) // 2)
        for _ in range(10_000):
            if len(children) >= self.population_size - len(parents):
                return children
            first = parents[min(rng.sample(range(len(parents)), tournament))]
            second = parents[min(rng.sample(range(len(parents)), tournament))]
            for child in crossover(records[first]["genome"], records[second]["genome"], rng):
                child = inversion(mutation(child, rng, self.mutation_prob), rng, self.inversion_prob)
                key = genome_hash(child)
                if key not in seen and len(children) < self.population_size - len(parents):
                    seen.add(key)
                    children.append(child)
        raise ValueError("10,000 offspring repeated earlier genomes: the search space is exhausted for this population")

    # -- state --------------------------------------------------------------------------------------------------------
    def _save(self, state: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.out_dir / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.out_dir / STATE_FILE)

    def load_state(self) -> dict[str, Any] | None:
        path = self.out_dir / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[eeea-search] {message}", file=sys.stderr, flush=True)

    # -- the loop -----------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the search; returns the final state (``records``: every evaluated genome)."""
        state = self.load_state()
        if state is None:
            rng = random.Random(self.seed)
            initial, rejected = early_exit_population(
                self.population_size, self.blocks, rng, self.params_of, self.max_params
            )
            self._log(f"EE-PI: {len(initial)} genomes under beta={self.max_params}M params, {rejected} rejected")
            state = {"rng": _rng_state_to_json(rng.getstate()), "generation": 0, "population": [], "parents": [],
                     "pending": initial, "records": {}, "initial_rejections": rejected}
            self._save(state)
        else:
            self._log(f"resuming from {self.out_dir / STATE_FILE} at generation {state['generation']}")
        self.initial_rejections = state["initial_rejections"]
        while True:
            if state["pending"]:
                self._evaluate_pending(state)
            records = state["records"]
            self.write_results(state)
            best = records[state["population"][0]]
            self._log(f"generation {state['generation']}/{self.generations} done: {len(records)} evaluated, best "
                      f"front member accuracy {best['accuracy']:.4f} at {best['params_mb']:.3f}M params")
            if state["generation"] >= self.generations:
                return state
            rng = random.Random()
            rng.setstate(_rng_state_from_json(state["rng"]))
            parents = state["population"][: self.parents]
            children = self._children(parents, records, rng)
            state.update(generation=state["generation"] + 1, parents=parents, pending=children,
                         rng=_rng_state_to_json(rng.getstate()))
            self._save(state)

    def _evaluate_pending(self, state: dict[str, Any]) -> None:
        """Evaluate the pending genomes not yet in the cache (saving after each), then the survivors of the parents
        and the evaluated children become the population."""
        records = state["records"]
        for i, genome in enumerate(state["pending"]):
            key = genome_hash(genome)
            if key in records:
                continue
            accuracy = self.evaluate(genome)
            records[key] = {"genome": genome, "generation": state["generation"], "accuracy": accuracy,
                            "params_mb": self.params_of(genome)}
            self._save(state)
            self._log(f"generation {state['generation']} [{i + 1}/{len(state['pending'])}] accuracy "
                      f"{accuracy:.4f}, {records[key]['params_mb']:.3f}M params")
        population = state["parents"] + [genome_hash(g) for g in state["pending"]]
        state.update(population=self._survivors(population, records), pending=[], parents=[])
        self._save(state)

    def write_results(self, state: dict[str, Any]) -> None:
        """``results.csv``, ``pareto.png`` and ``found_model.yaml`` of every genome evaluated so far."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = state["records"]
        keys = list(records)
        objectives = np.array([[100 - 100 * records[k]["accuracy"], records[k]["params_mb"]] for k in keys])
        rank = {}
        for r, front in enumerate(non_dominated_sort(objectives)):
            rank.update({keys[i]: r for i in front})
        with open(self.out_dir / "results.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["hash", "generation", "params_mb", "accuracy", "error", "front", "genome"])
            for k in keys:
                r = records[k]
                writer.writerow([k, r["generation"], f"{r['params_mb']:.6f}", f"{r['accuracy']:.6f}",
                                 f"{100 - 100 * r['accuracy']:.4f}", rank[k], json.dumps(r["genome"])])
        first = sorted((k for k in keys if rank[k] == 0), key=lambda k: records[k]["params_mb"])
        figure, axes = plt.subplots(figsize=(5, 4))
        axes.scatter([records[k]["params_mb"] for k in keys], [100 - 100 * records[k]["accuracy"] for k in keys],
                     c="0.6", s=14, label="evaluated")
        axes.plot([records[k]["params_mb"] for k in first], [100 - 100 * records[k]["accuracy"] for k in first],
                  "o-", c="tab:red", label="first front")
        axes.set(xlabel=f"parameters (M) at {self.eval_size[0]} cells x {self.eval_size[1]} channels",
                 ylabel="validation error (%)", title=f"EEEA search, generation {state['generation']}")
        axes.legend()
        figure.tight_layout()
        figure.savefig(self.out_dir / "pareto.png", dpi=100)
        plt.close(figure)
        best = max(first, key=lambda k: records[k]["accuracy"])
        found = {"model": {"class_path": "lit_methods.nas.EEEANet", "init_args": {"backbone": {
            "class_path": "lit_methods.nas.CellNetwork",
            "init_args": {"genome": records[best]["genome"], "layers": self.eval_size[0],
                          "channels": self.eval_size[1]}}}}}
        (self.out_dir / "found_model.yaml").write_text(
            f"# EEEA search result {best}: accuracy {records[best]['accuracy']:.4f} at the search size, "
            f"{records[best]['params_mb']:.3f}M parameters at the evaluation size\n" + yaml.safe_dump(found)
        )


def build_parser() -> Any:
    """The runner's parser: ``--config``, a ``data`` datamodule (``class_path``) and ``search`` (the arguments of
    :class:`EEEASearch`)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description="EEEA-Net evolutionary architecture search (arXiv:2108.06156)")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    parser.add_class_arguments(EEEASearch, "search", skip={"datamodule"}, instantiate=False)
    parser.add_argument("--seed_everything", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m lit_methods.nas.eeea_search --config search.yaml [--search.population=...]``: run or resume."""
    parser = build_parser()
    config = parser.parse_args(argv)
    classes = parser.instantiate_classes(config)
    return EEEASearch(classes.data, **vars(config.search)).run()


if __name__ == "__main__":
    main()
