"""Real-data evidence: on 8x8 digits at 1 and 10 images per class, every method's distilled set, evaluated by the
shared protocol (3 fresh ConvNets, 150 epochs, DSA), beats the random real subset of the same size it started from,
on the mean over distillation seeds.

For each distillation seed the random real subset is the set's initialisation (``init="real"``, drawn from that seed,
the same for every method), evaluated with the same nets (same evaluation seed): a paired comparison of mean
accuracies over the seeds (and the 3 nets of each). IPC 1 runs over 2 distillation seeds; IPC 10 over 1 in the suite
(the test-time budget), its 3-seed figures were measured by hand with this same code (README). A no-op method (the
images left at their initialisation, e.g. ``lr`` near 0) gives exactly the baseline's accuracy and fails the strict
``>``. ``datadam-sam`` is DataDAM with the MMD term off (``mmd_weight=0``), on distillation seed 0 (measured by hand on
seeds 0 / 1: 59.6% -> 79.2%, 73.1% -> 87.3%): the card's check that the attention matching alone carries signal
(checked to fail when the attention loss is replaced by zero: the images then do not
move and the assertion that they changed fails). DataDAM's images step at lr 0.1 here: the paper's 1.0 (32x32
CIFAR, thousands of steps) overshoots in this 60-step run on 8x8 digits (seed 1: 73.1% -> 57.6% at step 60, back to
85.6% at step 150), while 0.1 gives 83.1% / 86.5% at step 60 (measured by hand, same protocol).
"""

from __future__ import annotations

import pytest
import torch

from lit_methods.distillation import DCC, FYI, DataDAM, TESLA, evaluate_synset
from tests.distillation.helpers import EVALUATION, attached, distill, one_intra_op_thread

SEEDS = {1: (0, 1), 10: (0,)}
METHODS = {
    "datadam": (DataDAM, {"batch_real": 64, "lr": 0.1}, 60),
    "datadam-sam": (DataDAM, {"batch_real": 64, "lr": 0.1, "mmd_weight": 0.0}, 60),
    "fyi": (FYI, {"batch_real": 64}, 60),
    "dcc": (DCC, {"batch_real": 32, "inner_loop": 1, "inner_epochs": 0, "outer_warmup": 0}, 40),
    "tesla": (TESLA, {"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 2, "lr": 100.0, "lr_lr": 1e-5}, 40),
}
# (method, ipc, distillation seeds): SAM alone at IPC 1 (the card's check) on one seed, its margin being wide
CASES = [(name, ipc, SEEDS[ipc]) for name in METHODS if name != "datadam-sam" for ipc in SEEDS]
CASES.append(("datadam-sam", 1, (0,)))


@pytest.fixture(scope="module")
def random_real_accuracy() -> dict[tuple[int, int], float]:
    """Accuracy of the random real subsets (every method's initialisation) per (ipc, distillation seed)."""
    accuracies = {}
    with one_intra_op_thread():
        for ipc, seeds in SEEDS.items():
            for seed in seeds:
                module = attached(DataDAM, ipc=ipc, seed=seed)
                accuracies[ipc, seed] = evaluate_synset(
                    module.image_syn.detach(), module.label_syn, *module.real_test_set(), EVALUATION
                )[0]
    return accuracies


@pytest.mark.slow
@pytest.mark.parametrize(("name", "ipc", "seeds"), CASES, ids=[f"{name}-ipc{ipc}" for name, ipc, _ in CASES])
def test_distilled_set_beats_the_random_real_subset(name, ipc, seeds, random_real_accuracy, request):
    cls, kwargs, steps = METHODS[name]
    if cls is TESLA:
        kwargs = kwargs | {"buffer": str(request.getfixturevalue("expert_buffer"))}
    distilled, random_real = [], []
    for seed in seeds:
        module = attached(cls, ipc=ipc, seed=seed, **kwargs)
        initial = module.image_syn.detach().clone()
        distill(module, steps)
        assert not torch.equal(module.image_syn.detach(), initial)
        distilled.append(
            evaluate_synset(
                module.image_syn.detach(), module.synthetic_labels(), *module.real_test_set(), EVALUATION,
                module.learned_lr(),
            )[0]
        )
        random_real.append(random_real_accuracy[ipc, seed])
    mean_distilled, mean_random = sum(distilled) / len(distilled), sum(random_real) / len(random_real)
    print(
        f"{name} ipc {ipc} seeds {seeds}: random real {[round(100 * a, 1) for a in random_real]} "
        f"mean {100 * mean_random:.1f}%, distilled {[round(100 * a, 1) for a in distilled]} "
        f"mean {100 * mean_distilled:.1f}%"
    )
    assert mean_distilled > mean_random
