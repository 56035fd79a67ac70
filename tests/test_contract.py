"""The contract every available method meets, checked over the registry (after timm's ``tests/test_models.py``).

Each available entry is built from its CPU-sized config (``MethodEntry.cpu_config``) through the CLI with overrides
that keep it tiny (2-3 training steps, no validation, no logger), and must:

* build the class its entry points at (as the model, one of its submodules, a callback or the datamodule);
* train two steps with a finite training loss at each;
* give every trainable parameter a finite gradient at every optimizer step, read at ``on_before_optimizer_step``
  after every other callback (DP callbacks write the privatized ``p.grad`` there). A method declares what it freezes
  by ``requires_grad=False`` at that step: BD-KD trains its teacher online (it gets gradients), momentum encoders
  (MoCo v2) and linear evaluation's backbone are built with ``requires_grad_(False)``, and SlimFit toggles
  ``requires_grad`` of the tensors it freezes at each step, so no separate list of frozen names is needed;
* resume (exactly, ``torch.equal`` on CPU): 2 steps, a checkpoint, 1 more step from it gives the same weights and
  buffers as 3 uninterrupted steps;
* print a config (``--print_config``) that, passed back as ``--config``, parses and prints the same config.

A new method gets these checks by registering. The round trip resumes at an epoch boundary (``limit_train_batches=2``):
a plain Lightning checkpoint taken mid-epoch does not hold the loader's position (the hard-batch datamodule, which
saves it, resumes mid-pass). The global random states (dropout, per-image transforms, PGD starts, random mixing) are
in the checkpoint (``MethodBase.on_save_checkpoint``); samplers and on-device augmentations derive theirs from the
epoch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_methods import ImageClassifier
from lit_methods.cli import LitMethodsCLI
from lit_methods.registry import METHODS, MethodEntry, import_method

REPO = Path(__file__).resolve().parents[1]
AVAILABLE = [entry for entry in METHODS.values() if entry.status != "planned"]
CHECKPOINT_STEP = 2
TOTAL_STEPS = 3

TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.max_epochs=-1",
    f"--trainer.max_steps={TOTAL_STEPS}",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.val_check_interval=null",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--seed_everything=0",
]

# Per-entry overrides, each for a stated reason; every other entry gets DEFAULT_OVERRIDES.
DEFAULT_OVERRIDES = [f"--trainer.limit_train_batches={CHECKPOINT_STEP}", "--data.batch_size=16"]
OVERRIDES = {
    # Second stages read the first stage's checkpoint, which the contract does not train: start from random weights.
    "mlc": [*DEFAULT_OVERRIDES, "--model.pretrained_checkpoint=null"],
    "subgroup-fairness": [*DEFAULT_OVERRIDES, "--model.flow_augmentation=null"],
    # PubDef's sources are trained by a first-stage config the contract does not run: random sources, and a cheap
    # transfer-example cache (1 attack step, 1 copy) so that generating it does not dominate the run.
    "pubdef": [
        *DEFAULT_OVERRIDES,
        "--model.source_checkpoints=null",
        "--model.attacker_checkpoints=null",
        "--model.steps=1",
        "--model.copies=1",
    ],
    # Calibrating sigma to the epsilon budget runs opacus' RDP accountant for ~15 s per run: give sigma directly.
    # The noise seed is fixed so that the uninterrupted run and the resumed one draw the same noise (by default each
    # run draws a fresh seed from OS entropy; a resumed run restores its generator from the checkpoint).
    "dicesgd": [
        *DEFAULT_OVERRIDES,
        '--trainer.callbacks=[{"class_path": "lit_methods.callbacks.ErrorFeedbackDP", '
        '"init_args": {"clip_norm": 0.1, "noise_multiplier": 1.0, "target_epsilon": null, "seed": 0}}]',
    ],
    # The config's virtual batches of 64 need batches above 64 (GhostBatchNorm refuses one virtual batch per batch).
    "ghost-bn": [
        *DEFAULT_OVERRIDES,
        '--trainer.callbacks=[{"class_path": "lit_methods.callbacks.GhostBatchNorm", '
        '"init_args": {"virtual_batch_size": 8}}]',
    ],
    # The class-incremental stream wraps the dataset's datamodule, which holds the batch size.
    "nmc-baseline": [f"--trainer.limit_train_batches={CHECKPOINT_STEP}", "--data.datamodule.batch_size=16"],
    # One epoch per task, so that the resumed step is the first of task 1 (the old-model snapshot, prototypes, frozen
    # old code vectors and NA-PA are then part of the exact-resume check).
    "napa-vq": [
        f"--trainer.limit_train_batches={CHECKPOINT_STEP}",
        "--data.datamodule.batch_size=16",
        "--data.epochs_per_task=1",
    ],
    # HardBatchDataModule refuses limit_train_batches and resumes exactly from any step: checkpoint mid-pass.
    "hard-batches": ["--data.datamodule.batch_size=16"],
    # The CUDA datamodule wraps the dataset's datamodule, which owns the batch size.
    "cuda-unlearnable": [f"--trainer.limit_train_batches={CHECKPOINT_STEP}", "--data.datamodule.batch_size=16"],
    # Start from random weights (stage 1 is not trained here), take an upper step after every (2-step) epoch so the
    # checkpoint holds one, and skip the end-of-run judging of unlearning methods (their own tests cover them).
    "worst-case-forget": [
        f"--trainer.limit_train_batches={CHECKPOINT_STEP}",
        "--data.datamodule.batch_size=16",
        "--model.pretrained_checkpoint=null",
        "--model.lower_epochs=1",
        "--model.unlearning_methods=[]",
    ],
    # The victim checkpoint comes from a first stage the contract does not train: attack the randomly initialised
    # victim; rounds of 16 queries on a 2-step clock, and a small replay memory.
    "cabage": [
        f"--trainer.limit_train_batches={CHECKPOINT_STEP}",
        "--model.victim_checkpoint=null",
        "--model.batch_size=16",
        "--model.replay_size=256",
    ],
    # Prune at the second epoch, i.e. right at the resumed checkpoint, so the round trip covers a pruning step.
    "rd-prune": [*DEFAULT_OVERRIDES, "--model.pretrain_epochs=1"],
    # The distillation configs' evaluator trains fresh nets on the synthetic set when a run ends (3 nets x 300
    # epochs); the contract checks the distillation itself, so it runs without the callbacks.
    "datadam": [*DEFAULT_OVERRIDES, "--trainer.callbacks=[]"],
    "fyi": [*DEFAULT_OVERRIDES, "--trainer.callbacks=[]"],
    # DCC takes inner_loop image steps (optimizer steps) per training step; the contract counts one per step.
    "dcc": [*DEFAULT_OVERRIDES, "--trainer.callbacks=[]", "--model.inner_loop=1"],
    # TESLA reads the expert buffer its first stage writes (FIRST_STAGE_CONFIGS: 3 epochs of 2 batches).
    "tesla": [*DEFAULT_OVERRIDES, "--trainer.callbacks=[]", "--model.max_start_epoch=1"],
}
# Entries whose CPU config reads the checkpoint that another entry's CPU config writes: one step of that one first.
FIRST_STAGE = {"linear-eval": "simclr"}
# Entries whose CPU config reads what a config of their own first stage writes (not a registry entry): its arguments.
FIRST_STAGE_CONFIGS = {
    "tesla": [
        "--config=experiments/tesla/tesla_experts_convnet_digits.yaml",
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2",
    ]
}


class ContractRecorder(Callback):
    """Records the training loss of every step and whether every trainable parameter has a finite gradient when the
    optimizer steps; stops the run after ``stop_after_steps`` steps if given."""

    def __init__(self, stop_after_steps: int | None = None) -> None:
        self.stop_after_steps = stop_after_steps
        self.losses: list[float] = []
        self.gradient_problems: list[str] = []
        self.steps_checked = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.steps_checked += 1
        for name, param in pl_module.named_parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                self.gradient_problems.append(f"step {trainer.global_step + 1}: {name} has no gradient")
            elif not torch.isfinite(param.grad).all():
                self.gradient_problems.append(f"step {trainer.global_step + 1}: {name} has a non-finite gradient")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(math.nan if loss is None else float(loss))
        if self.stop_after_steps is not None and trainer.global_step >= self.stop_after_steps:
            trainer.should_stop = True


def build(entry: MethodEntry, *extra: str) -> LitMethodsCLI:
    overrides = OVERRIDES.get(entry.slug, DEFAULT_OVERRIDES)
    return LitMethodsCLI(args=["--config", str(REPO / entry.cpu_config), *TINY, *overrides, *extra], run=False)


def fit(
    entry: MethodEntry, stop_after_steps: int | None = None, ckpt_path: Path | None = None
) -> tuple[LitMethodsCLI, ContractRecorder]:
    """Train ``entry`` towards :data:`TOTAL_STEPS` steps (from ``ckpt_path`` if given), with the recorder last."""
    cli = build(entry)
    recorder = ContractRecorder(stop_after_steps)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli, recorder


def uses(cli: LitMethodsCLI, implementation: Any) -> bool:
    """Whether the built objects include an instance of ``implementation`` (a function: true)."""
    if not isinstance(implementation, type):
        return True
    candidates = [*cli.model.modules(), *vars(cli.model).values(), *cli.trainer.callbacks, cli.datamodule]
    return any(isinstance(candidate, implementation) for candidate in candidates)


def print_config(entry: MethodEntry, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build(entry, "--print_config")
    return capsys.readouterr().out


def check_contract(entry: MethodEntry, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Run every check of the module doc on ``entry`` (in the working directory: configs write relative paths); an
    ``AssertionError`` names the first one that fails."""
    implementation = import_method(entry.slug)
    if entry.slug in FIRST_STAGE:
        fit(METHODS[FIRST_STAGE[entry.slug]], stop_after_steps=1)
    if entry.slug in FIRST_STAGE_CONFIGS:
        config, *stage_args = FIRST_STAGE_CONFIGS[entry.slug]
        flag, _, path = config.partition("=")
        LitMethodsCLI(args=["fit", flag, str(REPO / path), *TINY, *stage_args])

    interrupted, recorder = fit(entry, stop_after_steps=CHECKPOINT_STEP)
    assert uses(interrupted, implementation), f"{entry.cpu_config} does not build {entry.import_path}"
    assert interrupted.trainer.global_step == CHECKPOINT_STEP, "the run stopped early"
    assert len(recorder.losses) == CHECKPOINT_STEP and all(map(math.isfinite, recorder.losses)), (
        f"training losses {recorder.losses}"
    )
    assert recorder.steps_checked == CHECKPOINT_STEP, "the optimizer did not step at every training step"
    assert not recorder.gradient_problems, "\n".join(recorder.gradient_problems)
    checkpoint = tmp_path / f"step={CHECKPOINT_STEP}.ckpt"
    interrupted.trainer.save_checkpoint(checkpoint)

    resumed, resumed_recorder = fit(entry, ckpt_path=checkpoint)
    uninterrupted, _ = fit(entry)
    assert resumed.trainer.global_step == uninterrupted.trainer.global_step == TOTAL_STEPS
    assert len(resumed_recorder.losses) == TOTAL_STEPS - CHECKPOINT_STEP
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), f"resumed {name} differs from the uninterrupted run"

    printed = print_config(entry, capsys)
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        LitMethodsCLI(args=["--config", str(saved), "--print_config"], run=False)
    assert capsys.readouterr().out == printed, "the printed config does not print itself back"


@pytest.fixture
def one_thread() -> None:
    """Tiny nets on a shared CPU: one intra-op thread is faster than several (the conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.mark.parametrize("entry", AVAILABLE, ids=[entry.slug for entry in AVAILABLE])
def test_method_meets_the_contract(entry, in_tmp_dir, capsys, one_thread):
    check_contract(entry, in_tmp_dir, capsys)


class NoGradientClassifier(ImageClassifier):
    """A broken method: its extra parameter never enters the loss, so it never receives a gradient."""

    slug: ClassVar[str] = "broken"

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.unused = nn.Parameter(torch.zeros(3))


class NonFiniteLossClassifier(ImageClassifier):
    """A broken method: its loss overflows to infinity."""

    slug: ClassVar[str] = "broken"

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().compute_loss(logits, targets) * math.inf


@pytest.mark.parametrize(
    ("broken_class", "failure"),
    [(NoGradientClassifier, "unused has no gradient"), (NonFiniteLossClassifier, "training losses")],
)
def test_the_contract_fails_for_a_broken_method(broken_class, failure, in_tmp_dir, capsys, monkeypatch, one_thread):
    """Register (for this test) a method built from a copy of a digits config with the broken class as the model."""
    config = in_tmp_dir / "experiments" / "broken" / "broken_convnet_digits.yaml"
    config.parent.mkdir(parents=True)
    classifier_config = (REPO / METHODS["randaugment"].cpu_config).read_text()
    class_path = f"{__name__}.{broken_class.__name__}"
    config.write_text(classifier_config.replace("lit_methods.ImageClassifier", class_path))
    broken = MethodEntry(
        slug="broken",
        paper="A broken method",
        url="https://example.org/broken",
        family="supervised",
        kind="module",
        import_path=class_path,
        status="available",
        cpu_config="experiments/broken/broken_convnet_digits.yaml",
    )
    monkeypatch.setitem(METHODS, broken.slug, broken)
    monkeypatch.setattr(sys.modules[__name__], "REPO", in_tmp_dir)
    with pytest.raises(AssertionError, match=failure):
        check_contract(broken, in_tmp_dir, capsys)
