"""DCC: the cross-class signal (the card's exact test) and the warm-up schedule of the official code."""

from __future__ import annotations

import torch

from lit_methods.distillation import DCC
from tests.distillation.helpers import TINY_NET, digits
from tests.helpers import cpu_trainer


def _class0_gradient(module: DCC, contrastive: bool) -> torch.Tensor:
    net = module.random_net()
    loss = module.gradient_matching_loss(net, contrastive)
    (grad,) = torch.autograd.grad(loss, module.image_syn)
    return grad[module.class_slice(0)]


def test_class0_gradient_depends_on_class1_images_only_with_contrastive_signals():
    """Class-wise DC: the gradient of class 0's synthetic images is unchanged (exactly) when class 1's synthetic
    images change; DCC's all-class gradient makes it change."""
    from tests.distillation.helpers import attached

    module = attached(DCC, ipc=2, batch_real=16, dsa=False)
    before = {flag: _class0_gradient(module, flag) for flag in (False, True)}
    with torch.no_grad():
        module.image_syn[module.class_slice(1)] += torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    after = {flag: _class0_gradient(module, flag) for flag in (False, True)}
    torch.testing.assert_close(after[False], before[False], atol=1e-7, rtol=0)
    assert (after[True] - before[True]).abs().max() > 1e-4


def test_warmup_is_class_wise_exactly_before_both_thresholds():
    """3 outer iterations of 3 inner steps, outer_warmup=2, inner_warmup=1: class-wise only at inner step 0 of the
    first two outer iterations (the official code's OR)."""
    module = DCC(ipc=1, batch_real=8, inner_loop=3, inner_epochs=1, outer_warmup=2, inner_warmup=1, **TINY_NET)
    flags = []
    compute = module.gradient_matching_loss
    module.gradient_matching_loss = lambda net, contrastive, salt=0: flags.append(contrastive) or compute(
        net, contrastive, salt
    )
    torch.set_num_threads(1)
    cpu_trainer(max_steps=9, max_epochs=-1).fit(module, datamodule=digits())
    assert flags == [False, True, True, False, True, True, True, True, True]
    assert not DCC(contrast=False, **TINY_NET).uses_contrast(outer=10**6, inner=10**6)
