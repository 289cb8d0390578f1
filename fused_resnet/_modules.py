"""Whether a module's call is observed or its tensors reparametrized: what decides, on every call, whether a
fused forward may replace the calls of the modules it reads (models/blocks.py, BatchNormAct2d.forward_conv).
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def no_global_hooks() -> bool:
    """No module hook is registered globally (nn.modules.module.register_module_forward_hook and friends)."""
    return not any(getattr(_module, name, None) for name in _GLOBAL_HOOKS)


def unobserved(m: nn.Module) -> bool:
    """No hook on ``m`` and no parametrization of its tensors (torch.nn.utils.prune and the old weight_norm
    are forward pre-hooks; parametrizations.weight_norm / spectral_norm are parametrizations)."""
    return not any(getattr(m, name, None) for name in _MODULE_HOOKS) and not parametrize.is_parametrized(m)
