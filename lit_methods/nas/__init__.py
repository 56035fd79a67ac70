"""Architecture search and once-for-all training: TAS, EEEA-Net and DepS."""

from lit_methods.nas.deps import DEpS, ElasticConvNet, SubnetConfig, SubnetScheduler, recalibrate_batchnorm
from lit_methods.nas.eeea import CellNetwork, EEEANet
from lit_methods.nas.shapes import ResNetShape, ShapedResNet, channel_interpolate, shape_flops
from lit_methods.nas.tas import TAS, TASDistillation, TASSearchResNet, flop_loss, kd_loss

__all__ = [
    "CellNetwork",
    "EEEANet",
    "DEpS",
    "ElasticConvNet",
    "SubnetConfig",
    "SubnetScheduler",
    "recalibrate_batchnorm",
    "TAS",
    "ResNetShape",
    "ShapedResNet",
    "TASDistillation",
    "TASSearchResNet",
    "channel_interpolate",
    "flop_loss",
    "kd_loss",
    "shape_flops",
]
