"""Make ``import torchvision`` work on CPU-only torch.

The PyPI torchvision 0.28.0 wheel is built against CUDA torch. On the CPU build of torch 2.13.0 its
C extension fails to load, and ``torchvision/_meta_registrations.py`` then dies registering fake
kernels for ``torchvision::nms`` / ``torchvision::qnms`` ("operator torchvision::nms does not
exist"). open_clip and avalanche import torchvision, so this module must run before either of them.

We first try to load the real extension; only when that fails do we declare the two op schemas
(without kernels: nothing in cl_merge calls NMS). On a machine where torchvision works this is a
no-op.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the Library object alive; dropping it would unregister the schemas


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _try_load_real_extension() -> bool:
    if "torchvision" in sys.modules:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision is not installed: nothing to patch
    pkg_dir = list(spec.submodule_search_locations)[0]
    for fname in os.listdir(pkg_dir):
        if fname.startswith("_C") and fname.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(pkg_dir, fname))
            except (OSError, RuntimeError):
                return False
            return _op_exists("nms")
    return False


def install() -> None:
    global _library
    if _library is not None or _try_load_real_extension():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _MISSING_SCHEMAS.items():
        if not _op_exists(name):
            _library.define(schema)


install()
