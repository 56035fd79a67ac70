"""The method registry: one entry per method, the source of ``lit-methods list`` and of the README table.

``status`` is ``"available"`` once the method's module, configs and behavioural tests have landed, ``"partial"`` when
part of the paper's contribution is usable and tested (the entry's ``note`` says what is missing), ``"planned"``
before; ``import_path`` of a planned entry is where the method will live.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

__all__ = ["METHODS", "MethodEntry", "format_table", "get_method", "import_method", "with_registry_table"]

Kind = Literal["module", "callback", "datamodule", "transform", "backbone", "sampler", "metric", "loss"]
Status = Literal["available", "partial", "planned"]


@dataclass(frozen=True)
class MethodEntry:
    """One method: its slug (from the project's method index), paper, family, kind, code and configs."""

    slug: str
    paper: str
    url: str | None
    family: str
    kind: Kind
    import_path: str
    configs: tuple[str, ...] = ()
    status: Status = "planned"
    note: str = ""

    @property
    def run(self) -> str:
        """How to run it: the CLI command of its first config, or how to attach it."""
        if self.status == "planned":
            return "—"
        if self.configs:
            return f"`lit-methods fit --config {self.configs[0]}`"
        return f"`{self.import_path}`"


def _entry(slug: str, paper: str, url: str | None, family: str, kind: Kind, import_path: str) -> MethodEntry:
    return MethodEntry(slug, paper, url, family, kind, import_path)


_ARXIV = "https://arxiv.org/abs/"

METHODS: dict[str, MethodEntry] = {
    e.slug: e
    for e in [
        MethodEntry(
            "baseline",
            "Deep Residual Learning for Image Recognition (supervised baseline classifier)",
            _ARXIV + "1512.03385",
            "supervised",
            "module",
            "lit_methods.ImageClassifier",
            (
                "experiments/quickstart.yaml",
                "experiments/baseline/baseline_resnet18_cifar10.yaml",
                "experiments/baseline/baseline_resnet18_cifar100.yaml",
                "experiments/baseline/baseline_resnet18_imagenet.yaml",
            ),
            "available",
        ),
        _entry(
            "fyi",
            "FYI: Flip Your Images for Dataset Distillation",
            _ARXIV + "2407.08113",
            "dataset distillation",
            "module",
            "lit_methods.distillation.FYI",
        ),
        _entry(
            "fedloge",
            "FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data",
            _ARXIV + "2401.08977",
            "federated",
            "module",
            "lit_methods.federated.FedLoGe",
        ),
        MethodEntry(
            "dicesgd",
            "Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach",
            _ARXIV + "2311.14632",
            "privacy",
            "callback",
            "lit_methods.callbacks.ErrorFeedbackDP",
            (
                "experiments/dicesgd/dicesgd_resnet20_cifar10.yaml",
                "experiments/dicesgd/dpsgd_gc_resnet20_cifar10.yaml",
                "experiments/dicesgd/dicesgd_convnet_digits.yaml",
            ),
            "available",
            "book-keeping per-sample clipping (vmap fallback); a step costs 1.9x a non-private one and 0.7x opacus on CPU",
        ),
        _entry(
            "worst-case-forget",
            "Challenging Forgets: Unveiling the Worst-Case Forget Sets in Machine Unlearning",
            _ARXIV + "2403.07362",
            "unlearning",
            "module",
            "lit_methods.unlearning.WorstCaseForget",
        ),
        MethodEntry(
            "projection-head",
            "Investigating the Benefits of Projection Head for Representation Learning",
            _ARXIV + "2403.11391",
            "self-supervised",
            "module",
            "lit_methods.ssl.ProjectionHeadStudy",
            (
                "experiments/projection-head/projection-head_resnet18_cifar10.yaml",
                "experiments/projection-head/projection-head_resnet18_cifar10_spectral.yaml",
                "experiments/projection-head/projection-head_convnet_digits.yaml",
                "experiments/projection-head/projection-head_convnet_digits_spectral.yaml",
                "experiments/projection-head/projection-head_convnet_digits_supervised.yaml",
            ),
            "available",
            "NT-Xent or spectral contrastive training with mlp/linear/none/fixed-reweight heads, kNN and effective rank by depth, the 2-layer linear theory replication and the supervised head (ProjectionHeadClassifier); SupCon and the spurious-feature benchmarks not included",
        ),
        MethodEntry(
            "ap",
            "AP: Selective Activation for De-sparsifying Pruned Neural Networks",
            _ARXIV + "2212.06145",
            "pruning",
            "callback",
            "lit_methods.callbacks.ActivatingWhilePruning",
            ("experiments/ap/ap_resnet20_cifar10.yaml", "experiments/ap/ap_convnet_fashion_mnist.yaml"),
            "available",
        ),
        _entry(
            "tesla",
            "Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory",
            _ARXIV + "2211.10586",
            "dataset distillation",
            "module",
            "lit_methods.distillation.TESLA",
        ),
        MethodEntry(
            "randaugment",
            "RandAugment: Practical automated data augmentation with a reduced search space",
            _ARXIV + "1909.13719",
            "augmentation",
            "transform",
            "lit_methods.datamodules.transforms.randaugment",
            ("experiments/randaugment/randaugment_wrn28_10_cifar10.yaml", "experiments/sweeps/randaugment_n_m.yaml"),
            "available",
        ),
        _entry(
            "spectformer",
            "SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
            _ARXIV + "2304.06446",
            "architecture",
            "backbone",
            "lit_methods.nets.SpectFormer",
        ),
        _entry(
            "fedossl",
            "Towards Unbiased Training in Federated Open-world Semi-supervised Learning",
            _ARXIV + "2305.00771",
            "federated",
            "module",
            "lit_methods.federated.FedoSSL",
        ),
        MethodEntry(
            "slimfit",
            "SlimFit: Memory-Efficient Fine-Tuning of Transformer-based Models Using Training Dynamics",
            _ARXIV + "2305.18513",
            "efficient fine-tuning",
            "callback",
            "lit_methods.callbacks.SlimFit",
            (
                "experiments/slimfit/slimfit_vit_cifar10.yaml",
                "experiments/slimfit/slimfit_vit_digits.yaml",
            ),
            "available",
            "inter-layer freezing; 4-bit GELU inputs, 8-bit fc2 inputs and attention operands (timm's explicit path during training), top-10% pruning of frozen-LayerNorm inputs; the saved query is timm's pre-scaled one",
        ),
        _entry(
            "polarization",
            "Learning a Consensus Sub-Network with Polarization Regularization and One Pass Training",
            _ARXIV + "2302.10798",
            "pruning",
            "module",
            "lit_methods.pruning.Polarization",
        ),
        _entry(
            "diffusion",
            "Enhancing Diffusion Models for High-Quality Image Generation (DDPM, DDIM, CFG, latent)",
            _ARXIV + "2412.14422",
            "generative",
            "module",
            "lit_methods.diffusion.Diffusion",
        ),
        _entry(
            "crossmax",
            "Ensemble everything everywhere: Multi-scale aggregation for adversarial robustness",
            _ARXIV + "2408.05446",
            "robustness",
            "module",
            "lit_methods.robustness.CrossMax",
        ),
        MethodEntry(
            "ssl-ey",
            "Unconstrained Stochastic CCA: Unifying Multiview and Self-Supervised Learning",
            _ARXIV + "2310.01012",
            "self-supervised",
            "module",
            "lit_methods.ssl.SSLEY",
            (
                "experiments/ssl-ey/ssl-ey_resnet18_cifar10.yaml",
                "experiments/ssl-ey/ssl-ey_resnet18_cifar100.yaml",
                "experiments/ssl-ey/ssl-ey_convnet_digits.yaml",
            ),
            "available",
            "SSL-EY and the stochastic CCA/PLS Eckhart-Young losses (losses.CCAEYLoss); solarization of the authors' augmentation not included",
        ),
        _entry(
            "lottery-ownership",
            "You are caught stealing my winning lottery ticket!",
            _ARXIV + "2111.00162",
            "pruning / IP protection",
            "module",
            "lit_methods.pruning.LotteryOwnership",
        ),
        _entry(
            "dcc",
            "Dataset Condensation with Contrastive Signals",
            _ARXIV + "2202.02916",
            "dataset distillation",
            "module",
            "lit_methods.distillation.DCC",
        ),
        _entry(
            "tas",
            "Network Pruning via Transformable Architecture Search",
            _ARXIV + "1905.09717",
            "pruning / NAS",
            "module",
            "lit_methods.nas.TAS",
        ),
        _entry(
            "eeea-net",
            "EEEA-Net: An Early Exit Evolutionary Neural Architecture Search",
            _ARXIV + "2108.06156",
            "NAS",
            "module",
            "lit_methods.nas.EEEANet",
        ),
        MethodEntry(
            "mlc",
            "Unsupervised Manifold Linearizing and Clustering",
            _ARXIV + "2301.01805",
            "clustering",
            "module",
            "lit_methods.ssl.MLC",
            (
                "experiments/mlc/tcr_resnet18_cifar10.yaml",
                "experiments/mlc/mlc_resnet18_cifar10.yaml",
                "experiments/mlc/tcr_convnet_digits.yaml",
                "experiments/mlc/mlc_convnet_digits.yaml",
            ),
            "available",
            "stage 1 TCRPretrain (losses.TotalCodingRateLoss), stage 2 MLC from its checkpoint (pretrained_checkpoint) or MLC.from_pretrained; on digits 0-3 MLC clusters at 0.96/0.95/0.96 (3 seeds) vs k-means 0.68/0.64/0.54 on the TCR features and 0.88 on pixels; eta/eps/lambda unconfirmed (appendix and official code not found)",
        ),
        MethodEntry(
            "selfie",
            "Selfie: Self-supervised Pretraining for Image Embedding",
            _ARXIV + "1906.02940",
            "self-supervised",
            "module",
            "lit_methods.ssl.Selfie",
            (
                "experiments/selfie/selfie_resnet50_cifar10.yaml",
                "experiments/selfie/selfie-finetune_resnet50_cifar10.yaml",
                "experiments/selfie/selfie_resnet20_fashion_mnist.yaml",
            ),
            "available",
            "patch network, attention pooling, patch-choice loss; fine-tuning with SelfieFineTuner; no official code exists, the patch network is a whole backbone",
        ),
        _entry(
            "cuda-unlearnable",
            "CUDA: Convolution-based Unlearnable Datasets",
            _ARXIV + "2303.04278",
            "data protection",
            "transform",
            "lit_methods.datamodules.unlearnable.CUDATransform",
        ),
        _entry(
            "pubdef",
            "PubDef: Defending Against Transfer Attacks From Public Models",
            _ARXIV + "2310.17645",
            "robustness",
            "module",
            "lit_methods.robustness.PubDef",
        ),
        MethodEntry(
            "multi-sample-dropout",
            "Multi-Sample Dropout for Accelerated Training and Better Generalization",
            _ARXIV + "1905.09788",
            "regularization",
            "module",
            "lit_methods.supervised.MultiSampleDropoutClassifier",
            (
                "experiments/multi-sample-dropout/multi-sample-dropout_vgg16_cifar10.yaml",
                "experiments/multi-sample-dropout/multi-sample-dropout_convnet_fashion_mnist.yaml",
            ),
            "available",
        ),
        _entry(
            "sparse-then-prune",
            "Sparse then Prune: Toward Efficient Vision Transformers",
            _ARXIV + "2307.11988",
            "pruning",
            "module",
            "lit_methods.pruning.SparseThenPrune",
        ),
        MethodEntry(
            "hard-batches",
            "Can we learn better with hard samples?",
            _ARXIV + "2304.03486",
            "training schedule",
            "module",
            "lit_methods.supervised.HardBatchClassifier",
            (
                "experiments/hard-batches/hard-batches_resnet18_cifar10.yaml",
                "experiments/hard-batches/hard-batches_convnet_digits.yaml",
            ),
            "available",
            "with lit_methods.datamodules.HardBatchDataModule; exact resume from any checkpoint (under DDP: from pass boundaries)",
        ),
        MethodEntry(
            "bd-kd",
            "BD-KD: Balancing the Divergences for Online Knowledge Distillation",
            _ARXIV + "2212.12965",
            "knowledge distillation",
            "module",
            "lit_methods.knowledge_distillation.BDKD",
            ("experiments/bd-kd/bd-kd_resnet56_resnet20_cifar100.yaml",),
            "available",
        ),
        _entry(
            "kdgqa",
            "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention",
            _ARXIV + "2408.08454",
            "architecture",
            "backbone",
            "lit_methods.nets.KDGQAViT",
        ),
        MethodEntry(
            "mixed-barlow-twins",
            "Guarding Barlow Twins Against Overfitting with Mixed Samples",
            _ARXIV + "2312.02151",
            "self-supervised",
            "module",
            "lit_methods.ssl.MixedBarlowTwins",
            (
                "experiments/mixed-barlow-twins/mixed-barlow-twins_resnet18_cifar10.yaml",
                "experiments/mixed-barlow-twins/mixed-barlow-twins_convnet_digits.yaml",
            ),
            "available",
            "Barlow Twins plus the mixed-sample regularizer (losses.MixedBarlowTwinsRegularizer, global-batch under DDP); SGD/LARS instead of the official Adam",
        ),
        _entry(
            "iir-snn",
            "One Timestep is All You Need: Training Spiking Neural Networks with Ultra Low Latency",
            _ARXIV + "2110.05929",
            "spiking nets",
            "module",
            "lit_methods.snn.IIRSNN",
        ),
        MethodEntry(
            "adv-finetune",
            "A Simple Fine-tuning Is All You Need: Robust Deep Learning Via Adversarial Fine-tuning",
            _ARXIV + "2012.13628",
            "robustness",
            "module",
            "lit_methods.robustness.AdversarialFineTune",
            (
                "experiments/adv-finetune/adv-finetune_resnet18_cifar10.yaml",
                "experiments/adv-finetune/adv-finetune_convnet_digits.yaml",
            ),
            "partial",
            "PGD training/fine-tuning, PGD and AutoAttack (torchattacks) evaluation; the slow-start fast-decay schedule's constants are unconfirmed (ours)",
        ),
        MethodEntry(
            "ghost-bn",
            "Train longer, generalize better (Ghost Batch Normalization, regime adaptation)",
            _ARXIV + "1705.08741",
            "large-batch training",
            "callback",
            "lit_methods.callbacks.GhostBatchNorm",
            (
                "experiments/ghost-bn/ghost-bn_resnet20_cifar10.yaml",
                "experiments/ghost-bn/ghost-bn_resnet20_cifar10_regime-adaptation.yaml",
                "experiments/ghost-bn/ghost-bn_convnet_fashion_mnist.yaml",
            ),
            "available",
        ),
        _entry(
            "time-shift",
            "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps",
            _ARXIV + "2305.15583",
            "generative",
            "sampler",
            "lit_methods.diffusion.TimeShiftSampler",
        ),
        _entry(
            "cabage",
            "CaBaGe: Data-Free Model Extraction using Class Balanced Generator Ensemble",
            _ARXIV + "2409.10643",
            "model extraction",
            "module",
            "lit_methods.robustness.CaBaGe",
        ),
        _entry(
            "nmc-baseline",
            "A Simple Baseline that Questions the Use of Pretrained-Models in Continual Learning",
            _ARXIV + "2210.04428",
            "continual",
            "module",
            "lit_methods.continual.NMCBaseline",
        ),
        _entry(
            "napa-vq",
            "NAPA-VQ: Neighborhood Aware Prototype Augmentation with Vector Quantization",
            "https://openaccess.thecvf.com/content/ICCV2023/html/Malepathirana_NAPA-VQ_Neighborhood-Aware_Prototype_Augmentation_with_Vector_Quantization_for_Continual_Learning_ICCV_2023_paper.html",
            "continual",
            "module",
            "lit_methods.continual.NAPAVQ",
        ),
        _entry(
            "otov2",
            "OTOV2: Automatic, Generic, User-Friendly",
            _ARXIV + "2303.06862",
            "pruning",
            "module",
            "lit_methods.pruning.OTOv2",
        ),
        _entry(
            "datadam",
            "DataDAM: Efficient Dataset Distillation with Attention Matching",
            _ARXIV + "2310.00093",
            "dataset distillation",
            "module",
            "lit_methods.distillation.DataDAM",
        ),
        MethodEntry(
            "subgroup-fairness",
            "Better May Not Be Fairer: Subgroup Discrepancy (CIFAR10-B, MacroStd, FlowAug)",
            _ARXIV + "2212.08649",
            "evaluation",
            "metric",
            "lit_methods.supervised.MacroStd",
            (
                "experiments/subgroup-fairness/subgroup-fairness_resnet18_cifar10b.yaml",
                "experiments/subgroup-fairness/subgroup-fairness_resnet18_cifar10b_flowaug.yaml",
                "experiments/subgroup-fairness/flowaug_glow_cifar10.yaml",
                "experiments/subgroup-fairness/flowaug_glow_digits.yaml",
                "experiments/subgroup-fairness/subgroup-fairness_convnet_digits_flowaug.yaml",
            ),
            "available",
            "CIFAR10-B/100-B, MacroStd, FlowAug on a Glow you train with FlowPretraining (the paper's pre-trained Glow is not published)",
        ),
        MethodEntry(
            "adapt",
            "Adaptive Precision Training (AdaPT)",
            _ARXIV + "2107.13490",
            "quantized training",
            "callback",
            "lit_methods.callbacks.AdaptivePrecision",
            (
                "experiments/adapt/adapt_resnet20_cifar10.yaml",
                "experiments/adapt/adapt_resnet20_cifar100.yaml",
                "experiments/adapt/adapt_convnet_digits.yaml",
            ),
            "available",
            "fixed-point weights/gradients (and optionally activations) with per-layer precision switching; follows the official code where the card differs",
        ),
        _entry(
            "deps",
            "DεpS: Delayed ε-Shrinking for Faster Once-For-All Training",
            _ARXIV + "2407.06167",
            "once-for-all",
            "module",
            "lit_methods.nas.DEpS",
        ),
        MethodEntry(
            "hallucinator",
            "Hallucination Improves the Performance of Unsupervised Visual Representation Learning",
            _ARXIV + "2307.12168",
            "self-supervised",
            "module",
            "lit_methods.ssl.Hallucinator",
            (
                "experiments/hallucinator/hallucinator_resnet18_cifar10.yaml",
                "experiments/hallucinator/hallucinator_mocov2_resnet18_cifar10.yaml",
                "experiments/hallucinator/hallucinator_convnet_digits.yaml",
            ),
            "available",
            "option of SimCLR, SimSiam and MoCo v2 (hallucinator=true); ContrastiveCrop not included",
        ),
        _entry(
            "pndm",
            "Pseudo Numerical Methods for Diffusion Models on Manifolds",
            _ARXIV + "2202.09778",
            "generative",
            "sampler",
            "lit_methods.diffusion.PNDMSampler",
        ),
        _entry(
            "rd-prune",
            "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks",
            "https://openaccess.thecvf.com/content/ICCV2023/html/Xu_Efficient_Joint_Optimization_of_Layer-Adaptive_Weight_Pruning_in_Deep_Neural_ICCV_2023_paper.html",
            "pruning",
            "module",
            "lit_methods.pruning.RDPrune",
        ),
    ]
}


def get_method(slug: str) -> MethodEntry:
    """The registry entry of ``slug``; a ``KeyError`` lists the known slugs."""
    try:
        return METHODS[slug]
    except KeyError:
        raise KeyError(f"unknown method {slug!r}; known: {', '.join(sorted(METHODS))}") from None


def import_method(slug: str) -> object:
    """Import the class or function behind an available method."""
    entry = get_method(slug)
    if entry.status == "planned":
        raise ImportError(f"method {slug!r} is planned, not available yet")
    module_name, _, name = entry.import_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def format_table(markdown: bool = False) -> str:
    """The registry as a Markdown table (the README's) or as aligned plain text."""
    header = ("slug", "paper", "family", "how to run", "status")
    rows = []
    for e in METHODS.values():
        paper = f"[{e.paper}]({e.url})" if (markdown and e.url) else e.paper
        status = f"{e.status}: {e.note}" if e.note else e.status
        rows.append((f"`{e.slug}`" if markdown else e.slug, paper, e.family, e.run, status))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in (0, 2, 4)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[4]:<{widths[2]}}  {r[2]:<{widths[1]}}  {r[1]}" for r in [header, *rows]
    )


README_START = "<!-- registry-table:start -->"
README_END = "<!-- registry-table:end -->"


def with_registry_table(readme: str) -> str:
    """``readme`` with the text between the registry-table markers replaced by :func:`format_table`."""
    head, start, rest = readme.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"the README lacks the markers {README_START} ... {README_END}")
    return f"{head}{start}\n{format_table(markdown=True)}\n{end}{tail}"


if __name__ == "__main__":  # python -m lit_methods.registry README.md: regenerate the README's table
    import sys
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(with_registry_table(path.read_text()))
