"""The "fusionbench" rule presets on an open_clip tower converted from a tiny random HF CLIP, against
oracles that follow FusionBench's rules on the HF model itself:

* OPCMForCLIP: walk the HF vision model's leaf modules; nn.Linear weights get the full-SVD
  projection, every other leaf module's parameters are summed, parameters held by non-leaf modules
  (the class embedding) are never visited; then every parameter is rescaled by mean‖τ‖/‖S_t‖.
* ISO-C's tensor handling: every 2-D tensor of the HF state dict (q, k, v separately, the position
  table) is a matrix, every other tensor is averaged over the tasks.
"""

import math

import pytest
import torch

import cl_merge  # noqa: F401  (the torchvision shim must precede transformers/open_clip)

transformers = pytest.importorskip("transformers")

from cl_merge.benchmarks.vision20.convert_hf_clip import hf_to_open_clip_visual  # noqa: E402
from cl_merge.registry import MERGERS  # noqa: E402
from _merging import run_merger  # noqa: E402

T = 3


def hf_models():
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=8, projection_dim=8,
                                        hidden_act="quick_gelu")
    torch.manual_seed(0)
    base = transformers.CLIPVisionModelWithProjection(cfg).eval()
    experts = []
    for i in range(T):
        e = transformers.CLIPVisionModelWithProjection(cfg).eval()
        e.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts.append(e)
    return base, experts


def params(model):
    return {k: v.detach().clone().double() for k, v in model.named_parameters()}


def norm(d):
    return math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))


def fb_opcm_oracle(base_model, experts, alpha=0.5):
    """FusionBench OPCMForCLIP.run, written over the HF module tree (float64)."""
    theta0 = params(base_model)
    merged = params(experts[0])
    taus = [norm({k: merged[k] - theta0[k] for k in theta0})]
    lam_prev = 1.0
    owner = {}  # parameter name -> how FusionBench reaches it
    for mname, module in base_model.named_modules():
        if len(list(module.children())):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            owner[full] = "linear" if isinstance(module, torch.nn.Linear) and pname == "weight" else "other"
    for e in experts[1:]:
        task = params(e)
        taus.append(norm({k: task[k] - theta0[k] for k in theta0}))
        avg = sum(taus) / len(taus)
        new = {}
        for k in theta0:
            prev = merged[k] - theta0[k]
            tau = task[k] - theta0[k]
            if owner.get(k) == "linear":
                u, s, vh = torch.linalg.svd(prev, full_matrices=True)
                r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tau @ vh.T
                p.diagonal().fill_(0)
                p[:r, :r] = 0
                new[k] = lam_prev * prev + u @ p @ vh
            elif owner.get(k) == "other":
                new[k] = lam_prev * prev + tau
            else:  # held by a non-leaf module: left as it is
                new[k] = prev
        s_norm = norm(new)
        lam_prev = s_norm / avg
        merged = {k: theta0[k] + new[k] * (avg / s_norm) for k in theta0}
    return merged


def iso_oracle(base_model, experts):
    """SAIM's spectrum rule (Eq. 11) with ISO-C's tensor handling, on the HF state dict (float64)."""
    theta0 = params(base_model)
    m = {k: torch.zeros_like(v) for k, v in theta0.items()}
    for t, e in enumerate(experts, start=1):
        task = params(e)
        out = {}
        for k in theta0:
            tau = task[k] - theta0[k]
            if tau.ndim == 2:
                u, s, vh = torch.linalg.svd(m[k] + tau, full_matrices=False)
                out[k] = u @ torch.diag(s.mean() + (s - s.mean()) / math.sqrt(t)) @ vh
            else:
                out[k] = ((t - 1) * m[k] + tau) / t
        m = out
    return {k: theta0[k] + m[k] for k in theta0}


def to_open_clip(hf_state):
    return hf_to_open_clip_visual({k: v.float() for k, v in hf_state.items()})


def merge_converted(merger, base_model, experts):
    base = to_open_clip(params(base_model))
    states = [to_open_clip(params(e)) for e in experts]
    return run_merger(merger, base, states, [base] * len(states))[-1]


def assert_close(got, expected, atol):
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k].double(), atol=atol, rtol=0, msg=k)


def test_opcm_fusionbench_preset_reproduces_opcm_for_clip_on_converted_weights():
    base_model, experts = hf_models()
    assert "embeddings.class_embedding" in dict(base_model.vision_model.named_parameters())
    expected = to_open_clip(fb_opcm_oracle(base_model, experts))
    got = merge_converted(MERGERS.get("opcm")(preset="fusionbench"), base_model, experts)
    assert_close(got, expected, atol=2e-6)
    # the default preset merges the class token too (the one documented difference)
    default = merge_converted(MERGERS.get("opcm")(), base_model, experts)
    assert not torch.allclose(default["class_embedding"], expected["class_embedding"].float(), atol=1e-4)


def test_isotropic_fusionbench_preset_follows_iso_c_tensor_handling_on_converted_weights():
    base_model, experts = hf_models()
    expected = to_open_clip(iso_oracle(base_model, experts))
    got = merge_converted(MERGERS.get("isotropic")(preset="fusionbench"), base_model, experts)
    assert_close(got, expected, atol=2e-6)
