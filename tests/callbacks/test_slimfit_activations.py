"""SlimFit's compressed saved activations: 8-bit inputs of trainable linear layers, 8-bit attention matmul operands
and the top-k pruning of frozen LayerNorm inputs. Saved bytes shrink by the exact amount each format implies, the
gradients stay close to the exact ones on real digits, the pruned LayerNorm backward equals a hand computation,
everything off is plain autograd bit for bit, and bad options are refused naming the value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from lit_methods.callbacks.slimfit import DEFAULT_QUANTIZED_LINEARS, SlimFit
from lit_methods.datamodules import DigitsDataModule
from lit_methods.datamodules.digits import load_digits_uint8
from lit_methods.nets import ViT

BLOCKS, WIDTH, HEADS, BATCH, TOKENS = 4, 32, 2, 16, 17  # 8x8 digits in 2x2 patches: 16 patches + the class token
ALL_OFF = {"quantize_gelu": False, "quantized_linears": (), "quantize_attention": False, "layernorm_keep_ratio": None}
EVERY_LINEAR = (r"qkv$", r"proj$", r"fc1$", r"fc2$")
LAYER_NORMS = 2 * BLOCKS + 1  # norm1, norm2 per block and the final norm


def tiny_vit(width: int = WIDTH, heads: int = HEADS, explicit_attention: bool = False) -> ViT:
    torch.manual_seed(0)
    vit = ViT(num_classes=10, in_channels=1, img_size=8, patch_size=2, embed_dim=width, depth=BLOCKS, num_heads=heads)
    if explicit_attention:
        for module in vit.modules():
            if isinstance(module, Attention):
                module.fused_attn = False
    return vit


def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_uint8()
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[:BATCH]
    mean, std = DigitsDataModule.mean[0], DigitsDataModule.std[0]
    return (images[pick].float() / 255 - mean) / std, labels[pick]


def freeze_layer_norms(slimfit: SlimFit) -> None:
    """Make ILS freeze exactly the LayerNorm weights (lowest scores; freeze_ratio must give LAYER_NORMS tensors)."""
    scores = [1.0 if "norm" in name else 1e6 + index for index, name in enumerate(slimfit.names)]
    slimfit.scheduler.load_state_dict({"scores": torch.tensor(scores, dtype=torch.float64)})
    frozen = slimfit.apply_schedule()
    assert len(frozen) == LAYER_NORMS and all("norm" in slimfit.names[i] for i in frozen)


def gradients(vit: nn.Module, slimfit: SlimFit | None) -> tuple[torch.Tensor, int]:
    """All gradients after one step on the digits batch, and the bytes the callback counted (0 without it)."""
    images, labels = digits_batch()
    if slimfit is None:
        F.cross_entropy(vit(images), labels).backward()
        saved = 0
    else:
        with slimfit.saved_activation_hooks():
            loss = F.cross_entropy(vit(images), labels)
        loss.backward()
        saved = slimfit.step_saved_bytes
    return torch.cat([p.grad.flatten() for p in vit.parameters() if p.grad is not None]), saved


def run(frozen_layer_norms: bool, explicit_attention: bool = True, width: int = WIDTH, **options):
    vit = tiny_vit(width, explicit_attention=explicit_attention)
    slimfit = SlimFit(freeze_ratio=0.36 if frozen_layer_norms else 0.0, **options)  # int(0.36 * 25) = 9
    slimfit.setup(None, vit, "fit")
    if frozen_layer_norms:
        freeze_layer_norms(slimfit)
    return gradients(vit, slimfit)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


def test_saved_bytes_shrink_by_the_factor_of_each_format():
    _, full = run(False, **ALL_OFF)  # explicit attention path, nothing compressed: 4 bytes per float
    tokens = BATCH * TOKENS
    # 8-bit linear inputs: qkv, proj, fc1 (width C) and fc2 (width 4C) inputs go from 4 bytes to 1 per value
    _, linear = run(False, **(ALL_OFF | {"quantized_linears": EVERY_LINEAR}))
    assert full - linear == 3 * BLOCKS * tokens * (3 * WIDTH + 4 * WIDTH)
    _, official_linear = run(False, **(ALL_OFF | {"quantized_linears": DEFAULT_QUANTIZED_LINEARS}))
    assert full - official_linear == 3 * BLOCKS * tokens * 4 * WIDTH  # the default: fc2 only, as in the official code
    # 8-bit attention operands: q, k, v (tokens x C each) and the probabilities (heads x N x N, counted once although
    # the softmax and the second matmul both save them)
    _, attention = run(False, **(ALL_OFF | {"quantize_attention": True}))
    assert full - attention == 3 * BLOCKS * (3 * tokens * WIDTH + BATCH * HEADS * TOKENS * TOKENS)
    # frozen LayerNorm: an input of n floats becomes int(0.1 n) values + int32 indices + per-row mean and std
    _, frozen_full = run(True, **ALL_OFF)
    _, pruned = run(True, **(ALL_OFF | {"layernorm_keep_ratio": 0.1}))
    values = tokens * WIDTH
    assert frozen_full - pruned == LAYER_NORMS * (4 * values - 8 * int(0.1 * values) - 8 * tokens)
    _, none_frozen = run(False, **(ALL_OFF | {"layernorm_keep_ratio": 0.1}))
    assert none_frozen == full  # trainable LayerNorms keep their whole input
    _, fused = run(False, explicit_attention=False, **ALL_OFF)
    _, everything = run(True, explicit_attention=False)
    print(f"saved bytes: fused attention {fused}, explicit {full}, 8-bit linears {linear}, 8-bit attention {attention}")
    print(f"frozen LayerNorms {frozen_full} -> pruned {pruned}; all defaults with 9 LayerNorms frozen {everything}")
    assert everything < 0.5 * fused


def test_the_attention_modules_run_explicitly_only_inside_the_hooks():
    vit = tiny_vit()
    slimfit = SlimFit(freeze_ratio=0.0)
    slimfit.setup(None, vit, "fit")
    modules = [m for m in vit.modules() if isinstance(m, Attention)]
    before = [m.fused_attn for m in modules]
    with slimfit.saved_activation_hooks():
        assert not any(m.fused_attn for m in modules)
    assert [m.fused_attn for m in modules] == before


def test_gradients_with_compressed_activations_stay_close_to_the_exact_ones():
    vit = tiny_vit()
    slimfit = SlimFit(freeze_ratio=0.36, **ALL_OFF)
    slimfit.setup(None, vit, "fit")
    freeze_layer_norms(slimfit)
    exact, _ = gradients(vit, None)  # plain autograd, the same 9 LayerNorm weights frozen
    cosines = {}
    for name, options in {
        "8-bit linear inputs": {"quantized_linears": EVERY_LINEAR},
        "8-bit attention": {"quantize_attention": True},
        "all quantization": {"quantize_gelu": True, "quantized_linears": EVERY_LINEAR, "quantize_attention": True},
        "LayerNorm keep 0.1": {"layernorm_keep_ratio": 0.1},
        "LayerNorm keep 0.5": {"layernorm_keep_ratio": 0.5},
        "LayerNorm keep 1.0": {"layernorm_keep_ratio": 1.0},
    }.items():
        compressed, _ = run(True, explicit_attention=False, **(ALL_OFF | options))
        assert not torch.equal(compressed, exact), name
        cosines[name] = cosine(compressed, exact)
    print("gradient cosine against exact:", {k: round(v, 4) for k, v in cosines.items()})
    assert min(cosines["8-bit linear inputs"], cosines["8-bit attention"], cosines["all quantization"]) > 0.98
    # pruning is a coarser approximation at width 32 (3 of 32 values per token kept on average): the cosine grows
    # with the kept share and reaches the exact gradient when nothing is pruned
    assert cosines["LayerNorm keep 0.1"] < cosines["LayerNorm keep 0.5"] < cosines["LayerNorm keep 1.0"]
    assert cosines["LayerNorm keep 0.1"] > 0.8 and cosines["LayerNorm keep 1.0"] > 0.99999


def test_layer_norm_pruning_keeps_the_gradient_at_width_192():
    exact, _ = run(True, width=192, **ALL_OFF)
    pruned, _ = run(True, width=192, **(ALL_OFF | {"layernorm_keep_ratio": 0.1}))
    print(f"width 192, LayerNorm keep 0.1: gradient cosine {cosine(pruned, exact):.4f}")
    assert cosine(pruned, exact) > 0.98


def test_pruned_layer_norm_backward_equals_the_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16, eps=1e-5), nn.Linear(16, 8)).double()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.normal_()
    slimfit = SlimFit(freeze_ratio=0.5, **(ALL_OFF | {"layernorm_keep_ratio": 0.1}))
    slimfit.setup(None, model, "fit")
    slimfit.scheduler.load_state_dict({"scores": torch.tensor([1.0, 2.0], dtype=torch.float64)})  # freeze the norm
    assert slimfit.apply_schedule() == [0] and slimfit.names[0] == "0.weight"
    x = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 5, 8, dtype=torch.float64)
    with slimfit.saved_activation_hooks():
        output = model(x)
    output.backward(upstream)
    # by hand: normalise, keep the int(0.1 * 320) = 32 largest |y| of the whole tensor, and apply the LayerNorm input
    # gradient dx = rstd * (g - mean(g) - y * mean(g * y)) with g = dL/d(output of the norm) * weight and y pruned
    mean = x.detach().mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5)
    y = (x.detach() - mean) * rstd
    threshold = y.abs().flatten().sort(descending=True).values[31]
    pruned = torch.where(y.abs() >= threshold, y, torch.zeros_like(y))
    assert int((pruned != 0).sum()) == 32
    grad_norm_output = upstream @ model[1].weight.detach()
    g = grad_norm_output * model[0].weight.detach()
    expected = rstd * (g - g.mean(-1, keepdim=True) - pruned * (g * pruned).mean(-1, keepdim=True))
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
    unpruned = rstd * (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True))
    assert (x.grad - unpruned).abs().max() > 1e-3  # the pruning changes the gradient
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[0].bias.grad, grad_norm_output.sum((0, 1)), rtol=1e-12, atol=1e-12)
    norm_output = F.layer_norm(x.detach(), (16,), model[0].weight, model[0].bias, 1e-5)
    torch.testing.assert_close(model[1].weight.grad, upstream.flatten(0, 1).T @ norm_output.flatten(0, 1))


def test_everything_off_is_plain_autograd_and_gelu_only_is_the_previous_behaviour():
    vit = tiny_vit()
    reference = tiny_vit()
    slimfit = SlimFit(freeze_ratio=0.75, seed=3, **ALL_OFF)
    slimfit.setup(None, vit, "fit")
    frozen = set(slimfit.apply_schedule())
    for name, parameter in reference.named_parameters():
        if name in slimfit.names:
            parameter.requires_grad_(slimfit.names.index(name) not in frozen)
    with_hooks, saved = gradients(vit, slimfit)
    plain, _ = gradients(reference, None)
    assert torch.equal(with_hooks, plain) and saved > 0
    assert all(m.fused_attn for m in vit.modules() if isinstance(m, Attention))
    # GELU only (the callback before the 8-bit and pruning options): GELU inputs in 4 bits, all else untouched
    gelu_only = SlimFit(freeze_ratio=0.0, **(ALL_OFF | {"quantize_gelu": True}))
    vit = tiny_vit()
    gelu_only.setup(None, vit, "fit")
    quantized, _ = gradients(vit, gelu_only)
    reference = tiny_vit()
    inside_gelu = []
    for module in reference.modules():
        if isinstance(module, nn.GELU):
            module.register_forward_pre_hook(lambda m, i: inside_gelu.append(True))
            module.register_forward_hook(lambda m, i, o: inside_gelu.clear())

    def pack(tensor):
        return ("gelu", torch.round(tensor * 2).clamp(-8, 7) / 2) if inside_gelu else ("plain", tensor)

    images, labels = digits_batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved[1]):
        loss = F.cross_entropy(reference(images), labels)
    loss.backward()
    by_hand = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    assert torch.equal(quantized, by_hand)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantized_linears": ["fc2("]}, r"quantized_linears.*fc2\("),
        ({"quantized_linears": "fc2"}, "quantized_linears.*'fc2'"),
        ({"quantize_attention": "yes"}, "quantize_attention.*'yes'"),
        ({"layernorm_keep_ratio": 0.0}, "layernorm_keep_ratio.*0.0"),
        ({"layernorm_keep_ratio": 1.5}, "layernorm_keep_ratio.*1.5"),
        ({"layernorm_keep_ratio": True}, "layernorm_keep_ratio.*True"),
    ],
)
def test_bad_options_are_rejected_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlimFit(**kwargs)


def test_options_that_match_nothing_in_the_model_are_refused_at_setup():
    with pytest.raises(ValueError, match=r"quantized_linears patterns \['decoder'\] match no nn.Linear"):
        SlimFit(quantized_linears=["decoder"]).setup(None, tiny_vit(), "fit")
    convnet = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(ValueError, match="quantize_attention=True but Sequential has no timm Attention"):
        SlimFit(quantized_linears=()).setup(None, convnet, "fit")
    vit = tiny_vit()
    vit.encoder.blocks[2].attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.attn_drop\.p is 0\.1"):
        SlimFit().setup(None, vit, "fit")
