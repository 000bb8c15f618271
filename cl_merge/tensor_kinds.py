"""What kind of tensor a merged parameter is: the one place every merger and metric asks.

Mergers that treat tensors differently (spectral rules on matrices, element-wise rules elsewhere)
declare a rule table ``{Kind: rule}`` and resolve each parameter with ``rule_for``. The kinds, decided
from the parameter's name and shape:

==============  ==============================================================  ======================
kind            what it is                                                      open_clip image tower
==============  ==============================================================  ======================
``qkv``         stacked q/k/v projection, 2-D (3d × d)                          ``*.attn.in_proj_weight``
``matrix``      any other 2-D weight (linear maps; LM token embeddings when      ``attn.out_proj.weight``,
                merged)                                                         ``mlp.c_fc/c_proj.weight``,
                                                                                ``proj``
``conv``        convolution kernel / patch embedding (3-D or more)               ``conv1.weight``
``positional``  positional embedding table                                       ``positional_embedding``
``embedding``   learned token vector (class token)                              ``class_embedding``
``norm``        LayerNorm / RMSNorm weight or bias                               ``ln_pre/ln_post/ln_1/ln_2.*``
``bias``        bias vector (including the stacked ``in_proj_bias``)             ``*.bias``, ``in_proj_bias``
``other``       scalars and any other tensor                                     (none)
==============  ==============================================================  ======================

open_clip stacks q, k and v in one ``in_proj_weight``; Hugging Face CLIP (and the reference code that
runs on it: FusionBench, ISO-C, TSV-M) has three d × d matrices. ``split_qkv``/``join_qkv`` cut the
stacked tensor into those three row blocks (q = rows 0..d−1, k = d..2d−1, v = 2d..3d−1, the layout
``nn.MultiheadAttention`` and the HF → open_clip conversion use) and put them back.

Rules are strings; a table may map a matrix-only rule (``MATRIX_RULES``) to a kind whose tensor turns
out not to be 2-D (e.g. a 3-D positional embedding): ``rule_for`` then returns the table's
element-wise rule (``table[Kind.OTHER]``), so a spectral rule never sees a vector.
"""

from __future__ import annotations

import enum
import re
from typing import Callable, Dict, Mapping, Tuple

import torch


class Kind(str, enum.Enum):
    QKV = "qkv"
    MATRIX = "matrix"
    CONV = "conv"
    POSITIONAL = "positional"
    EMBEDDING = "embedding"
    NORM = "norm"
    BIAS = "bias"
    OTHER = "other"


RuleTable = Mapping[Kind, str]

_NORM_PART = re.compile(r"^(ln(_\w+)?|\w*norm\w*|\w*layrnorm\w*)$", re.IGNORECASE)
_POSITIONAL_PART = re.compile(r"^(positional_embedding|position_embedding|pos_embed(ding)?|wpe)$")
_TOKEN_PART = re.compile(r"^(class_embedding|cls_token|class_token)$")


def tensor_kind(name: str, tensor: torch.Tensor) -> Kind:
    """The kind of parameter ``name`` (module doc). Names are dotted module paths (``a.b.weight``)."""
    parts = name.split(".")
    leaf = parts[-1]
    owners = parts[:-1] if leaf in ("weight", "bias") else parts
    if tensor.ndim == 0:
        return Kind.OTHER
    if any(_POSITIONAL_PART.match(p) for p in owners):
        return Kind.POSITIONAL
    if any(_TOKEN_PART.match(p) for p in owners):
        return Kind.EMBEDDING
    if tensor.ndim == 1 and any(_NORM_PART.match(p) for p in parts[:-1]):
        return Kind.NORM
    if tensor.ndim == 1 and (leaf == "bias" or leaf.endswith("_bias")):
        return Kind.BIAS
    if tensor.ndim == 2:
        if leaf == "in_proj_weight" and tensor.shape[0] == 3 * tensor.shape[1]:
            return Kind.QKV
        return Kind.MATRIX
    if tensor.ndim >= 3:
        return Kind.CONV
    return Kind.OTHER


def rule_for(name: str, tensor: torch.Tensor, table: RuleTable) -> str:
    """The rule ``table`` assigns to this parameter (a matrix-only rule on a non-2-D tensor falls
    back to ``table[Kind.OTHER]``; see the module doc)."""
    kind = tensor_kind(name, tensor)
    rule = table[kind]
    if rule in MATRIX_RULES and tensor.ndim != 2:
        return table[Kind.OTHER]
    return rule


def resolve(state: Mapping[str, torch.Tensor], table: RuleTable) -> Dict[str, str]:
    """name → rule for every tensor of ``state`` (used by docs and tests to print a tower's table)."""
    return {n: rule_for(n, t, table) for n, t in state.items()}


#: rule names that need a 2-D tensor (rules ending in ``_flat`` reshape a conv kernel first)
MATRIX_RULES = frozenset({"spectral", "spectral_blocks", "project", "project_blocks", "matrix", "blocks"})


# ---- q/k/v blocks ------------------------------------------------------------------------------
def split_qkv(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v): the three row blocks of a stacked (3d × …) tensor, as views."""
    if tensor.shape[0] % 3:
        raise ValueError(f"a stacked q/k/v tensor has 3d rows; got shape {tuple(tensor.shape)}")
    q, k, v = tensor.chunk(3, dim=0)
    return q, k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_qkv``."""
    return torch.cat([q, k, v], dim=0)


def map_blocks(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to the q, k and v blocks of stacked tensors (all of the same shape) and restack."""
    blocks = [split_qkv(t) for t in tensors]
    return join_qkv(*(fn(*(b[i] for b in blocks)) for i in range(3)))


# ---- conv kernels as matrices ------------------------------------------------------------------
def flatten_conv(tensor: torch.Tensor) -> torch.Tensor:
    """A conv kernel (out, in, k, …) as the (out, in·k·…) matrix of the linear map it applies to
    each patch (for a ViT's patch embedding, exactly the linear patch projection)."""
    return tensor.reshape(tensor.shape[0], -1)
