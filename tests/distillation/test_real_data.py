"""Real-data evidence: on 8x8 digits at 1 and 10 images per class, every method's distilled set, evaluated by the
shared protocol (3 fresh ConvNets, 150 epochs, DSA), beats the random real subset of the same size it started from.

The random real subset is the set's initialisation (``init="real"``, the same seed for every method), evaluated with
the same nets (same seeds): a paired comparison of mean accuracies over the 3 nets. A no-op method (the images left
at their initialisation, e.g. ``lr`` near 0) gives exactly the baseline's accuracy and fails the strict ``>``.
"""

from __future__ import annotations

import pytest
import torch

from lit_methods.distillation import DCC, FYI, DataDAM, TESLA, evaluate_synset
from tests.distillation.helpers import EVALUATION, attached, distill, one_intra_op_thread

IPCS = (1, 10)
METHODS = {
    "datadam": (DataDAM, {"batch_real": 64}, 60),
    "fyi": (FYI, {"batch_real": 64}, 60),
    "dcc": (DCC, {"batch_real": 32, "inner_loop": 1, "inner_epochs": 0, "outer_warmup": 0}, 40),
    "tesla": (TESLA, {"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 2, "lr": 100.0, "lr_lr": 1e-5}, 40),
}


@pytest.fixture(scope="module")
def random_real_accuracy() -> dict[int, float]:
    """Accuracy of the random real subsets (every method's initialisation) at each ipc."""
    accuracies = {}
    with one_intra_op_thread():
        for ipc in IPCS:
            module = attached(DataDAM, ipc=ipc)
            accuracies[ipc] = evaluate_synset(
                module.image_syn.detach(), module.label_syn, *module.real_test_set(), EVALUATION
            )[0]
    return accuracies


@pytest.mark.slow
@pytest.mark.parametrize("ipc", IPCS)
@pytest.mark.parametrize("name", list(METHODS))
def test_distilled_set_beats_the_random_real_subset(name, ipc, random_real_accuracy, request):
    cls, kwargs, steps = METHODS[name]
    if cls is TESLA:
        kwargs = kwargs | {"buffer": str(request.getfixturevalue("expert_buffer"))}
    module = attached(cls, ipc=ipc, **kwargs)
    initial = module.image_syn.detach().clone()
    distill(module, steps)
    assert not torch.equal(module.image_syn.detach(), initial)
    accuracy = evaluate_synset(
        module.image_syn.detach(), module.synthetic_labels(), *module.real_test_set(), EVALUATION, module.learned_lr()
    )[0]
    print(f"{name} ipc {ipc}: random real {100 * random_real_accuracy[ipc]:.1f}%, distilled {100 * accuracy:.1f}%")
    assert accuracy > random_real_accuracy[ipc]
