"""The pruning toolbox: torch-pruning export of zeroed channels and the per-layer sparsity report and chart."""

from __future__ import annotations

import torch
from torch import nn

from lit_methods.pruning.report import layer_sparsity, save_sparsity_bar_chart
from lit_methods.pruning.structured import channel_groups, count_parameters, export_pruned


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    ).eval()


def test_export_removes_zeroed_channels_without_changing_the_output() -> None:
    """Zeroing the out-side slices of channels makes them removable: the export computes the same logits. The second
    group is dropped entirely, which keeps one all-zero channel (torch-pruning cannot remove a layer)."""
    net = small_net()
    x = torch.randn(5, 1, 8, 8)
    groups = channel_groups(net, x[:1], ["7"])
    assert sorted(g.root for g in groups) == ["0", "3"]
    params = dict(net.named_parameters())
    keep = {"0": torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), "3": torch.zeros(4, dtype=torch.bool)}
    with torch.no_grad():
        for group in groups:
            for name, idxs in group.out_slices:
                params[name][idxs[~keep[group.root]]] = 0.0
    slim = export_pruned(net, x[:1], keep, ["7"])
    assert slim[0].out_channels == 3 and slim[3].out_channels == 1 and slim[7].in_features == 64
    assert torch.allclose(slim(x), net(x), atol=1e-6)
    assert count_parameters(slim) < count_parameters(net)
    assert net[0].out_channels == 6  # the original is untouched


def test_layer_sparsity_and_bar_chart(tmp_path) -> None:
    net = small_net()
    with torch.no_grad():
        net[0].weight[:3] = 0.0
    report = layer_sparsity(net)
    assert report == {"0": 0.5, "3": 0.0, "7": 0.0}
    path = save_sparsity_bar_chart(report, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
