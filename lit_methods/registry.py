"""The method registry: one record per method, the source of ``lit-methods list``/``show`` and of the README table.

``status`` is ``"available"`` once the method's module, configs and behavioural tests have landed, ``"partial"`` when
part of the paper's contribution is usable and tested (the entry's ``note`` says what is missing), ``"planned"``
before; ``import_path`` of a planned entry is where the method will live. The class behind an available entry's
``import_path`` names the entry's slug in a ``slug`` class attribute.

A method's configs are not listed here: they are the files matching its ``config_patterns`` under ``experiments/``
(by default ``experiments/<slug>/*.yaml``). ``cpu_config`` is the one sized for a laptop CPU (small nets on sklearn
digits or Fashion-MNIST); the contract test (``tests/test_contract.py``) builds and trains every available method
from it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from typing import Literal

__all__ = [
    "METHODS",
    "MethodEntry",
    "close_matches",
    "describe",
    "first_paragraph",
    "format_list",
    "format_table",
    "get_method",
    "import_method",
    "with_registry_table",
]

Kind = Literal["module", "callback", "datamodule", "transform", "backbone", "sampler", "metric", "loss"]
Status = Literal["available", "partial", "planned"]

NOTE_MAX_CHARS = 100
LIST_FAMILY_CHARS = 15
_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True, kw_only=True)
class MethodEntry:
    """One method: its slug (from the project's method index), paper, family, kind, code, configs and status.

    Args:
        slug: the method's short name, lower-case words joined by ``-``.
        paper: the paper's title.
        url: the paper's page (``https://``).
        family: the research area (``"self-supervised"``, ``"pruning"`` ...).
        kind: what the code is (a LightningModule, a callback, a transform ...).
        import_path: ``package.module.Name`` of the class (or function) that implements it.
        status: ``"available"``, ``"partial"`` or ``"planned"`` (see the module doc).
        cpu_config: path (from the repository root, ``experiments/...``) of the config sized for a laptop CPU;
            required unless planned.
        config_patterns: glob patterns, relative to ``experiments/``, of the method's configs (default
            ``<slug>/*.yaml``).
        note: at most one short line (what is missing or how it differs); details live in the class docstring.
    """

    slug: str
    paper: str
    url: str
    family: str
    kind: Kind
    import_path: str
    status: Status = "planned"
    cpu_config: str | None = None
    config_patterns: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if not _SLUG.match(self.slug):
            raise ValueError(f"slug must be lower-case words joined by '-', got {self.slug!r}")
        if not self.url.startswith("https://"):
            raise ValueError(f"{self.slug}: url must start with https://, got {self.url!r}")
        if self.status not in ("available", "partial", "planned"):
            raise ValueError(f"{self.slug}: status must be available, partial or planned, got {self.status!r}")
        if len(self.note) > NOTE_MAX_CHARS or "\n" in self.note:
            raise ValueError(
                f"{self.slug}: note is {len(self.note)} characters; keep it to one line of at most {NOTE_MAX_CHARS} "
                "and move the details into the class docstring"
            )
        if self.status == "planned" and (self.cpu_config or self.config_patterns):
            raise ValueError(f"{self.slug}: a planned method has no configs, got cpu_config={self.cpu_config!r}")
        if self.status != "planned":
            if not self.cpu_config or not self.cpu_config.startswith("experiments/"):
                raise ValueError(
                    f"{self.slug}: a {self.status} method names its CPU-sized config as experiments/..., "
                    f"got cpu_config={self.cpu_config!r}"
                )
            if not self.config_patterns:
                object.__setattr__(self, "config_patterns", (f"{self.slug}/*.yaml",))

    @property
    def configs(self) -> tuple[str, ...]:
        """The method's configs found under ``experiments/`` (``experiments/...`` paths, sorted per pattern); read from
        the package ``lit_methods.experiments``, which is the source tree's ``experiments/`` folder once installed."""
        root = resources.files("lit_methods.experiments")
        found: list[str] = []
        for pattern in self.config_patterns:
            folder, _, name_pattern = pattern.rpartition("/")
            directory = root.joinpath(folder) if folder else root
            if not directory.is_dir():
                continue
            names = sorted(p.name for p in directory.iterdir() if p.is_file() and fnmatchcase(p.name, name_pattern))
            found += [f"experiments/{folder + '/' if folder else ''}{name}" for name in names]
        return tuple(found)

    @property
    def run(self) -> str:
        """How to run it: the CLI command of its CPU-sized config."""
        if self.status == "planned":
            return "—"
        return f"`lit-methods fit --config {self.cpu_config}`"


_ARXIV = "https://arxiv.org/abs/"

_ENTRIES = (
    MethodEntry(
        slug="baseline",
        paper="Deep Residual Learning for Image Recognition (supervised baseline classifier)",
        url=_ARXIV + "1512.03385",
        family="supervised",
        kind="module",
        import_path="lit_methods.ImageClassifier",
        status="available",
        config_patterns=("quickstart.yaml", "baseline/*.yaml"),
        cpu_config="experiments/quickstart.yaml",
    ),
    MethodEntry(
        slug="simclr",
        paper="A Simple Framework for Contrastive Learning of Visual Representations (SimCLR)",
        url=_ARXIV + "2002.05709",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.SimCLR",
        status="available",
        config_patterns=("ssl/simclr_*.yaml",),
        cpu_config="experiments/ssl/simclr_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="barlow-twins",
        paper="Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
        url=_ARXIV + "2103.03230",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.BarlowTwins",
        status="available",
        config_patterns=("ssl/barlow_twins_*.yaml",),
        cpu_config="experiments/ssl/barlow_twins_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="simsiam",
        paper="Exploring Simple Siamese Representation Learning (SimSiam)",
        url=_ARXIV + "2011.10566",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.SimSiam",
        status="available",
        config_patterns=("ssl/simsiam_*.yaml",),
        cpu_config="experiments/ssl/simsiam_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="moco-v2",
        paper="Improved Baselines with Momentum Contrastive Learning (MoCo v2)",
        url=_ARXIV + "2003.04297",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.MoCoV2",
        status="available",
        config_patterns=("ssl/moco_v2_*.yaml",),
        cpu_config="experiments/ssl/moco_v2_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="linear-eval",
        paper="Revisiting Self-Supervised Visual Representation Learning (linear evaluation of frozen features)",
        url=_ARXIV + "1901.09005",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.LinearEvaluation",
        status="available",
        config_patterns=("ssl/linear_eval_*.yaml",),
        cpu_config="experiments/ssl/linear_eval_convnet_digits.yaml",
        note="reads an SSL checkpoint (ssl_checkpoint): run simclr_convnet_digits.yaml first",
    ),
    MethodEntry(
        slug="fyi",
        paper="FYI: Flip Your Images for Dataset Distillation",
        url=_ARXIV + "2407.08113",
        family="dataset distillation",
        kind="module",
        import_path="lit_methods.distillation.FYI",
        status="available",
        cpu_config="experiments/fyi/fyi_convnet_digits.yaml",
        note="on DM; fyi flag also on DCC, DataDAM and TESLA",
    ),
    MethodEntry(
        slug="fedloge",
        paper="FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data",
        url=_ARXIV + "2401.08977",
        family="federated",
        kind="module",
        import_path="lit_methods.federated.FedLoGe",
        status="available",
        cpu_config="experiments/fedloge/fedloge_convnet_digits.yaml",
        note="federation: python -m lit_methods.federated or flwr run (lit_methods.federated.flower)",
    ),
    MethodEntry(
        slug="dicesgd",
        paper="Differentially Private SGD Without Clipping Bias: An Error-Feedback Approach",
        url=_ARXIV + "2311.14632",
        family="privacy",
        kind="callback",
        import_path="lit_methods.callbacks.ErrorFeedbackDP",
        status="partial",
        cpu_config="experiments/dicesgd/dicesgd_convnet_digits.yaml",
        note="paper's privacy theorem not implemented: default accountant a provable, loose bound",
    ),
    MethodEntry(
        slug="worst-case-forget",
        paper="Challenging Forgets: Unveiling the Worst-Case Forget Sets in Machine Unlearning",
        url=_ARXIV + "2403.07362",
        family="unlearning",
        kind="module",
        import_path="lit_methods.unlearning.WorstCaseForget",
        status="available",
        cpu_config="experiments/worst-case-forget/worst-case-forget_convnet_digits.yaml",
        note="lower level FT only (no RL/EU/boundary/SCRUB lower-level variants); IU's Fisher inverse exact",
    ),
    MethodEntry(
        slug="projection-head",
        paper="Investigating the Benefits of Projection Head for Representation Learning",
        url=_ARXIV + "2403.11391",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.ProjectionHeadStudy",
        status="available",
        cpu_config="experiments/projection-head/projection-head_convnet_digits.yaml",
        note="SupCon and the spurious-feature benchmarks not included",
    ),
    MethodEntry(
        slug="ap",
        paper="AP: Selective Activation for De-sparsifying Pruned Neural Networks",
        url=_ARXIV + "2212.06145",
        family="pruning",
        kind="callback",
        import_path="lit_methods.callbacks.ActivatingWhilePruning",
        status="available",
        cpu_config="experiments/ap/ap_convnet_fashion_mnist.yaml",
    ),
    MethodEntry(
        slug="tesla",
        paper="Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory",
        url=_ARXIV + "2211.10586",
        family="dataset distillation",
        kind="module",
        import_path="lit_methods.distillation.TESLA",
        status="available",
        cpu_config="experiments/tesla/tesla_convnet_digits.yaml",
        note="build the expert buffer first (tesla_experts_*.yaml); ZCA buffers for CIFAR",
    ),
    MethodEntry(
        slug="randaugment",
        paper="RandAugment: Practical automated data augmentation with a reduced search space",
        url=_ARXIV + "1909.13719",
        family="augmentation",
        kind="transform",
        import_path="lit_methods.datamodules.transforms.randaugment",
        status="available",
        cpu_config="experiments/randaugment/randaugment_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="spectformer",
        paper="SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
        url=_ARXIV + "2304.06446",
        family="architecture",
        kind="backbone",
        import_path="lit_methods.nets.SpectFormer",
        status="available",
        cpu_config="experiments/spectformer/spectformer_tiny_digits.yaml",
        note="vanilla SpectFormer only (no hierarchical SpectFormer-H)",
    ),
    MethodEntry(
        slug="fedossl",
        paper="Towards Unbiased Training in Federated Open-world Semi-supervised Learning",
        url=_ARXIV + "2305.00771",
        family="federated",
        kind="module",
        import_path="lit_methods.federated.FedoSSL",
        status="available",
        cpu_config="experiments/fedossl/fedossl_convnet_digits.yaml",
        note="one augmented view; SimCLR start: fedossl_resnet18_cifar10_from_simclr.yaml",
    ),
    MethodEntry(
        slug="slimfit",
        paper="SlimFit: Memory-Efficient Fine-Tuning of Transformer-based Models Using Training Dynamics",
        url=_ARXIV + "2305.18513",
        family="efficient fine-tuning",
        kind="callback",
        import_path="lit_methods.callbacks.SlimFit",
        status="partial",
        cpu_config="experiments/slimfit/slimfit_vit_digits.yaml",
        note="defaults 8 points below full fine-tuning on a tiny digits ViT (paper: within 0.4); not tested",
    ),
    MethodEntry(
        slug="polarization",
        paper="Learning a Consensus Sub-Network with Polarization Regularization and One Pass Training",
        url=_ARXIV + "2302.10798",
        family="pruning",
        kind="module",
        import_path="lit_methods.compression.Polarization",
        status="available",
        cpu_config="experiments/polarization/polarization_convnet_digits.yaml",
        note="static (input-independent) gates; the dynamic gating head is not implemented",
    ),
    MethodEntry(
        slug="diffusion",
        paper="Enhancing Diffusion Models for High-Quality Image Generation (DDPM, DDIM, CFG, latent)",
        url=_ARXIV + "2412.14422",
        family="generative",
        kind="module",
        import_path="lit_methods.diffusion.Diffusion",
        status="available",
        cpu_config="experiments/diffusion/diffusion_unet_digits.yaml",
        note="latent first stage: KL autoencoder with MSE only (no perceptual or GAN loss)",
    ),
    MethodEntry(
        slug="crossmax",
        paper="Ensemble everything everywhere: Multi-scale aggregation for adversarial robustness",
        url=_ARXIV + "2408.05446",
        family="robustness",
        kind="module",
        import_path="lit_methods.robustness.CrossMax",
        status="available",
        cpu_config="experiments/crossmax/crossmax_convnet_digits.yaml",
        note="trains from scratch (no ImageNet ResNet-152); input stack keeps the image size",
    ),
    MethodEntry(
        slug="ssl-ey",
        paper="Unconstrained Stochastic CCA: Unifying Multiview and Self-Supervised Learning",
        url=_ARXIV + "2310.01012",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.SSLEY",
        status="available",
        cpu_config="experiments/ssl-ey/ssl-ey_convnet_digits.yaml",
        note="solarization of the authors' augmentation not included",
    ),
    MethodEntry(
        slug="lottery-ownership",
        paper="You are caught stealing my winning lottery ticket!",
        url=_ARXIV + "2111.00162",
        family="pruning / IP protection",
        kind="module",
        import_path="lit_methods.compression.LotteryOwnership",
        status="available",
        cpu_config="experiments/lottery-ownership/lottery-ownership_convnet_digits.yaml",
        note="embedded signature + path pruning; ticket mask by magnitude (no IMP search, no trigger set)",
    ),
    MethodEntry(
        slug="dcc",
        paper="Dataset Condensation with Contrastive Signals",
        url=_ARXIV + "2202.02916",
        family="dataset distillation",
        kind="module",
        import_path="lit_methods.distillation.DCC",
        status="available",
        cpu_config="experiments/dcc/dcc_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="tas",
        paper="Network Pruning via Transformable Architecture Search",
        url=_ARXIV + "1905.09717",
        family="pruning / NAS",
        kind="module",
        import_path="lit_methods.nas.TAS",
        status="available",
        cpu_config="experiments/tas/tas_resnet8_digits.yaml",
        note="one residual-width decision per stage; train/valid halves are halves of each batch",
    ),
    MethodEntry(
        slug="eeea-net",
        paper="EEEA-Net: An Early Exit Evolutionary Neural Architecture Search",
        url=_ARXIV + "2108.06156",
        family="NAS",
        kind="module",
        import_path="lit_methods.nas.EEEANet",
        status="available",
        cpu_config="experiments/eeea-net/eeea-net_cellnet_digits.yaml",
        note="search: python -m lit_methods.nas.eeea_search; DARTS ops only, no auxiliary head or cutout",
    ),
    MethodEntry(
        slug="mlc",
        paper="Unsupervised Manifold Linearizing and Clustering",
        url=_ARXIV + "2301.01805",
        family="clustering",
        kind="module",
        import_path="lit_methods.ssl.MLC",
        status="available",
        cpu_config="experiments/mlc/mlc_convnet_digits.yaml",
        note="two stages (from TCR or MoCo v2): run tcr_convnet_digits.yaml first; eta/eps/lambda unconfirmed",
    ),
    MethodEntry(
        slug="selfie",
        paper="Selfie: Self-supervised Pretraining for Image Embedding",
        url=_ARXIV + "1906.02940",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.Selfie",
        status="partial",
        cpu_config="experiments/selfie/selfie_resnet20_fashion_mnist.yaml",
        note="no official code; the gain at small label fractions not reproduced on CPU digits",
    ),
    MethodEntry(
        slug="cuda-unlearnable",
        paper="CUDA: Convolution-based Unlearnable Datasets",
        url=_ARXIV + "2303.04278",
        family="data protection",
        kind="datamodule",
        import_path="lit_methods.datamodules.unlearnable.CUDAUnlearnableDataModule",
        status="available",
        cpu_config="experiments/cuda-unlearnable/cuda-unlearnable_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="pubdef",
        paper="PubDef: Defending Against Transfer Attacks From Public Models",
        url=_ARXIV + "2310.17645",
        family="robustness",
        kind="module",
        import_path="lit_methods.robustness.PubDef",
        status="available",
        cpu_config="experiments/pubdef/pubdef_convnet_digits.yaml",
        note="mix mode only (no worst-k or EMA source weighting); transfer examples of un-augmented images",
    ),
    MethodEntry(
        slug="multi-sample-dropout",
        paper="Multi-Sample Dropout for Accelerated Training and Better Generalization",
        url=_ARXIV + "1905.09788",
        family="regularization",
        kind="module",
        import_path="lit_methods.supervised.MultiSampleDropoutClassifier",
        status="available",
        cpu_config="experiments/multi-sample-dropout/multi-sample-dropout_convnet_fashion_mnist.yaml",
    ),
    MethodEntry(
        slug="sparse-then-prune",
        paper="Sparse then Prune: Toward Efficient Vision Transformers",
        url=_ARXIV + "2307.11988",
        family="pruning",
        kind="module",
        import_path="lit_methods.compression.SparseThenPrune",
        status="available",
        cpu_config="experiments/sparse-then-prune/sparse-then-prune_vit_digits.yaml",
        note="CIFAR config needs 384px resizing and IN-21k weights supplied by the user",
    ),
    MethodEntry(
        slug="hard-batches",
        paper="Can we learn better with hard samples?",
        url=_ARXIV + "2304.03486",
        family="training schedule",
        kind="module",
        import_path="lit_methods.supervised.HardBatchClassifier",
        status="available",
        cpu_config="experiments/hard-batches/hard-batches_convnet_digits.yaml",
        note="trains on lit_methods.datamodules.HardBatchDataModule",
    ),
    MethodEntry(
        slug="bd-kd",
        paper="BD-KD: Balancing the Divergences for Online Knowledge Distillation",
        url=_ARXIV + "2212.12965",
        family="knowledge distillation",
        kind="module",
        import_path="lit_methods.knowledge_distillation.BDKD",
        status="available",
        cpu_config="experiments/bd-kd/bd-kd_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="kdgqa",
        paper="Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention",
        url=_ARXIV + "2408.08454",
        family="architecture",
        kind="backbone",
        import_path="lit_methods.nets.KDGQAViT",
        status="available",
        cpu_config="experiments/kdgqa/kdgqa_vit_digits.yaml",
    ),
    MethodEntry(
        slug="mixed-barlow-twins",
        paper="Guarding Barlow Twins Against Overfitting with Mixed Samples",
        url=_ARXIV + "2312.02151",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.MixedBarlowTwins",
        status="available",
        cpu_config="experiments/mixed-barlow-twins/mixed-barlow-twins_convnet_digits.yaml",
        note="SGD/LARS instead of the official Adam",
    ),
    MethodEntry(
        slug="iir-snn",
        paper="One Timestep is All You Need: Training Spiking Neural Networks with Ultra Low Latency",
        url=_ARXIV + "2110.05929",
        family="spiking nets",
        kind="module",
        import_path="lit_methods.snn.IIRSNN",
        status="available",
        cpu_config="experiments/iir-snn/iir-snn_spikingvgg_digits.yaml",
        note="trains from scratch: the ANN-to-SNN conversion before the T=5 stage is not included",
    ),
    MethodEntry(
        slug="adv-finetune",
        paper="A Simple Fine-tuning Is All You Need: Robust Deep Learning Via Adversarial Fine-tuning",
        url=_ARXIV + "2012.13628",
        family="robustness",
        kind="module",
        import_path="lit_methods.robustness.AdversarialFineTune",
        status="partial",
        cpu_config="experiments/adv-finetune/adv-finetune_convnet_digits.yaml",
        note="schedule constants unconfirmed (no official code); beats a constant LR only at high peak LR",
    ),
    MethodEntry(
        slug="ghost-bn",
        paper="Train longer, generalize better (Ghost Batch Normalization, regime adaptation)",
        url=_ARXIV + "1705.08741",
        family="large-batch training",
        kind="callback",
        import_path="lit_methods.callbacks.GhostBatchNorm",
        status="available",
        cpu_config="experiments/ghost-bn/ghost-bn_convnet_fashion_mnist.yaml",
    ),
    MethodEntry(
        slug="time-shift",
        paper="Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps",
        url=_ARXIV + "2305.15583",
        family="generative",
        kind="sampler",
        import_path="lit_methods.diffusion.TimeShiftSampler",
        status="available",
        cpu_config="experiments/time-shift/time-shift_mlp_digits.yaml",
        note="on DDIM and DDPM (official 'shift the target' window); DDPM refuses window // 2 > T // S",
    ),
    MethodEntry(
        slug="cabage",
        paper="CaBaGe: Data-Free Model Extraction using Class Balanced Generator Ensemble",
        url=_ARXIV + "2409.10643",
        family="model extraction",
        kind="module",
        import_path="lit_methods.extraction.CaBaGe",
        status="available",
        cpu_config="experiments/cabage/cabage_convnet_digits.yaml",
        note="built from the abstract and DisGUIDE's code (paper body, official code not found)",
    ),
    MethodEntry(
        slug="nmc-baseline",
        paper="A Simple Baseline that Questions the Use of Pretrained-Models in Continual Learning",
        url=_ARXIV + "2210.04428",
        family="continual",
        kind="module",
        import_path="lit_methods.continual.NMCBaseline",
        status="available",
        cpu_config="experiments/nmc-baseline/nmc-baseline_convnet_digits.yaml",
        note="under Lightning ddp learn the means with learn_class_means (a predict pass)",
    ),
    MethodEntry(
        slug="napa-vq",
        paper="NAPA-VQ: Neighborhood Aware Prototype Augmentation with Vector Quantization",
        url="https://openaccess.thecvf.com/content/ICCV2023/html/Malepathirana_NAPA-VQ_Neighborhood-Aware_Prototype_Augmentation_with_Vector_Quantization_for_Continual_Learning_ICCV_2023_paper.html",
        family="continual",
        kind="module",
        import_path="lit_methods.continual.NAPAVQ",
        status="available",
        cpu_config="experiments/napa-vq/napa-vq_convnet_digits.yaml",
        note="paper weights pass the digits check on 16x16 input (8x8 config: new classes 66%); no CBAM",
    ),
    MethodEntry(
        slug="otov2",
        paper="OTOV2: Automatic, Generic, User-Friendly",
        url=_ARXIV + "2303.06862",
        family="pruning",
        kind="module",
        import_path="lit_methods.compression.OTOv2",
        status="available",
        cpu_config="experiments/otov2/otov2_convnet_digits.yaml",
        note="ZIGs at channel granularity from torch-pruning's graph; no ONNX export",
    ),
    MethodEntry(
        slug="datadam",
        paper="DataDAM: Efficient Dataset Distillation with Attention Matching",
        url=_ARXIV + "2310.00093",
        family="dataset distillation",
        kind="module",
        import_path="lit_methods.distillation.DataDAM",
        status="available",
        cpu_config="experiments/datadam/datadam_convnet_digits.yaml",
    ),
    MethodEntry(
        slug="subgroup-fairness",
        paper="Better May Not Be Fairer: Subgroup Discrepancy (CIFAR10-B, MacroStd, FlowAug)",
        url=_ARXIV + "2212.08649",
        family="evaluation",
        kind="metric",
        import_path="lit_methods.supervised.MacroStd",
        status="partial",
        cpu_config="experiments/subgroup-fairness/subgroup-fairness_convnet_digits_flowaug.yaml",
        note="FlowAug did not lower MacroStd on colour-shifted digits: Glow keeps the colour in its coarse level",
    ),
    MethodEntry(
        slug="adapt",
        paper="Adaptive Precision Training (AdaPT)",
        url=_ARXIV + "2107.13490",
        family="quantized training",
        kind="callback",
        import_path="lit_methods.callbacks.AdaptivePrecision",
        status="available",
        cpu_config="experiments/adapt/adapt_convnet_digits.yaml",
        note="follows the official code where the card differs",
    ),
    MethodEntry(
        slug="deps",
        paper="DεpS: Delayed ε-Shrinking for Faster Once-For-All Training",
        url=_ARXIV + "2407.06167",
        family="once-for-all",
        kind="module",
        import_path="lit_methods.nas.DEpS",
        status="available",
        cpu_config="experiments/deps/deps_elasticconvnet_digits.yaml",
        note="official code not found: schedule knobs from the paper's text; shrink start by step fraction",
    ),
    MethodEntry(
        slug="hallucinator",
        paper="Hallucination Improves the Performance of Unsupervised Visual Representation Learning",
        url=_ARXIV + "2307.12168",
        family="self-supervised",
        kind="module",
        import_path="lit_methods.ssl.Hallucinator",
        status="partial",
        cpu_config="experiments/hallucinator/hallucinator_convnet_digits.yaml",
        note="option of SimCLR/SimSiam/MoCo v2; no ContrastiveCrop; gain over plain not reproduced on CPU digits",
    ),
    MethodEntry(
        slug="pndm",
        paper="Pseudo Numerical Methods for Diffusion Models on Manifolds",
        url=_ARXIV + "2202.09778",
        family="generative",
        kind="sampler",
        import_path="lit_methods.diffusion.PNDMSampler",
        status="available",
        cpu_config="experiments/pndm/pndm_mlp_digits.yaml",
        note="F-PNDM, S-PNDM and DDIM through the transfer part; FON not included",
    ),
    MethodEntry(
        slug="rd-prune",
        paper="Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks",
        url="https://openaccess.thecvf.com/content/ICCV2023/html/Xu_Efficient_Joint_Optimization_of_Layer-Adaptive_Weight_Pruning_in_Deep_Neural_ICCV_2023_paper.html",
        family="pruning",
        kind="module",
        import_path="lit_methods.compression.RDPrune",
        status="available",
        cpu_config="experiments/rd-prune/rd-prune_convnet_digits.yaml",
        note="unstructured variant; calibration images taken from the first training batches",
    ),)

METHODS: dict[str, MethodEntry] = {entry.slug: entry for entry in _ENTRIES}


def get_method(slug: str) -> MethodEntry:
    """The registry entry of ``slug``; a ``KeyError`` names the closest slugs (or all of them)."""
    try:
        return METHODS[slug]
    except KeyError:
        close = close_matches(slug)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(METHODS))}"
        raise KeyError(f"unknown method {slug!r}; {hint}") from None


def close_matches(slug: str) -> list[str]:
    """Registered slugs that look like ``slug`` (a prefix, a substring or a near spelling), best first."""
    near = difflib.get_close_matches(slug, list(METHODS), n=5, cutoff=0.6)
    containing = [s for s in METHODS if slug and (slug in s or s in slug) and s not in near]
    return near + sorted(containing)


def import_method(slug: str) -> object:
    """Import the class or function behind an available method."""
    entry = get_method(slug)
    if entry.status == "planned":
        raise ImportError(f"method {slug!r} is planned, not available yet")
    module_name, _, name = entry.import_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_list(width: int = 80) -> str:
    """One line per method: slug, status, family (cut to :data:`LIST_FAMILY_CHARS`) and paper title, each line cut to
    ``width`` characters with an ellipsis."""
    slug_width = max(len(slug) for slug in METHODS)
    status_width = max(len(e.status) for e in METHODS.values())
    rows = [("slug", "status", "family", "paper"), *((e.slug, e.status, e.family, e.paper) for e in METHODS.values())]
    return "\n".join(
        _truncate(
            f"{slug:<{slug_width}}  {status:<{status_width}}  "
            f"{_truncate(family, LIST_FAMILY_CHARS):<{LIST_FAMILY_CHARS}}  {paper}",
            width,
        )
        for slug, status, family, paper in rows
    )


def format_table() -> str:
    """The registry as the README's Markdown table."""
    header = ("slug", "paper", "family", "how to run", "status")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in METHODS.values():
        status = f"{e.status}: {e.note}" if e.note else e.status
        lines.append(f"| `{e.slug}` | [{e.paper}]({e.url}) | {e.family} | {e.run} | {status} |")
    return "\n".join(lines)


def first_paragraph(text: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    paragraph = inspect.cleandoc(text or "").split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def describe(slug: str) -> str:
    """What ``lit-methods show SLUG`` prints: paper, code, configs, status and the class docstring's first paragraph."""
    entry = get_method(slug)
    lines = [
        f"{entry.slug}: {entry.paper}",
        f"  paper:      {entry.url}",
        f"  family:     {entry.family} ({entry.kind})",
        f"  code:       {entry.import_path}",
        f"  status:     {entry.status}" + (f" ({entry.note})" if entry.note else ""),
    ]
    if entry.status == "planned":
        return "\n".join(lines)
    lines.append(f"  cpu config: {entry.cpu_config}")
    lines.append("  configs:")
    lines += [f"    {config}" for config in entry.configs]
    lines += ["", textwrap.fill(first_paragraph(import_method(slug).__doc__), width=100)]
    return "\n".join(lines)


README_START = "<!-- registry-table:start -->"
README_END = "<!-- registry-table:end -->"


def with_registry_table(readme: str) -> str:
    """``readme`` with the text between the registry-table markers replaced by :func:`format_table`."""
    head, start, rest = readme.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"the README lacks the markers {README_START} ... {README_END}")
    return f"{head}{start}\n{format_table()}\n{end}{tail}"


if __name__ == "__main__":  # python -m lit_methods.registry README.md: regenerate the README's table
    import sys
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(with_registry_table(path.read_text()))
