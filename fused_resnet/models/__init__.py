"""The ResNet family: fused models (drop-in for torchvision's), convert(), and the eager reference."""
from . import torchvision_reference
from .convert import ConversionReport, convert, convert_sync_batchnorm
from .resnet import (BUILDERS, FusedBasicBlock, FusedBottleneck, FusedResNet, load_weights, resnet18, resnet34,
                     resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2,
                     wide_resnet101_2)

__all__ = ["BUILDERS", "ConversionReport", "FusedBasicBlock", "FusedBottleneck", "FusedResNet", "convert",
           "convert_sync_batchnorm", "load_weights", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "torchvision_reference", "wide_resnet50_2", "wide_resnet101_2"]
