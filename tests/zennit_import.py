"""zennit, importable without torchvision.

zennit imports ``torchvision.models.resnet`` at import time, for canonizers of
torchvision's ResNets that the tests do not use. The only torchvision wheels on the
package index are CUDA builds that replace the CPU PyTorch the tests run on (and fail to
load against it), so CI installs zennit without dependencies and, where torchvision is
missing, this module stands in two empty classes for the names zennit imports."""

from __future__ import annotations

import sys
import types


def zennit():
    try:
        import torchvision.models.resnet  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that does not load
        import torch
        for name in ("torchvision", "torchvision.models", "torchvision.models.resnet"):
            sys.modules[name] = types.ModuleType(name)
        resnet = sys.modules["torchvision.models.resnet"]
        resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
        resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
        sys.modules["torchvision"].models = sys.modules["torchvision.models"]
        sys.modules["torchvision.models"].resnet = resnet
    import zennit as z
    import zennit.attribution
    import zennit.canonizers
    import zennit.composites
    return z
