"""Tensor kinds and the mergers' rule tables on an open_clip image tower; the q/k/v split against
nn.MultiheadAttention's own use of the stacked weight."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cl_merge  # noqa: F401  (torchvision shim before open_clip)
from cl_merge import sar
from cl_merge.strategies import isotropic, opcm, ties
from cl_merge.tensor_kinds import Kind, join_qkv, resolve, split_qkv, tensor_kind


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("cfg")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    (path / "kinds-test-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model("kinds-test-vit", pretrained=None).visual


# every parameter name of open_clip's VisionTransformer (layer index dropped) -> kind
EXPECTED_KINDS = {
    "class_embedding": Kind.EMBEDDING, "positional_embedding": Kind.POSITIONAL, "proj": Kind.MATRIX,
    "conv1.weight": Kind.CONV, "ln_pre.weight": Kind.NORM, "ln_pre.bias": Kind.NORM,
    "ln_post.weight": Kind.NORM, "ln_post.bias": Kind.NORM,
    "attn.in_proj_weight": Kind.QKV, "attn.in_proj_bias": Kind.BIAS,
    "attn.out_proj.weight": Kind.MATRIX, "attn.out_proj.bias": Kind.BIAS,
    "ln_1.weight": Kind.NORM, "ln_1.bias": Kind.NORM, "ln_2.weight": Kind.NORM, "ln_2.bias": Kind.NORM,
    "mlp.c_fc.weight": Kind.MATRIX, "mlp.c_fc.bias": Kind.BIAS,
    "mlp.c_proj.weight": Kind.MATRIX, "mlp.c_proj.bias": Kind.BIAS,
}


def short(name):
    return name.split(".", 3)[-1] if name.startswith("transformer.resblocks.") else name


def test_every_tensor_of_an_open_clip_tower_has_its_kind(tower):
    names = {short(n): tensor_kind(n, p) for n, p in tower.named_parameters()}
    assert names == EXPECTED_KINDS


def test_generic_names_fall_back_on_shape():
    assert tensor_kind("w", torch.zeros(3, 4)) is Kind.MATRIX
    assert tensor_kind("conv", torch.zeros(3, 2, 2, 2)) is Kind.CONV
    assert tensor_kind("bias", torch.zeros(3)) is Kind.BIAS
    assert tensor_kind("b", torch.zeros(3)) is Kind.OTHER
    assert tensor_kind("logit_scale", torch.zeros(())) is Kind.OTHER
    assert tensor_kind("model.layers.0.input_layernorm.weight", torch.zeros(3)) is Kind.NORM
    assert tensor_kind("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3)) is Kind.MATRIX
    assert tensor_kind("x.in_proj_weight", torch.zeros(5, 4)) is Kind.MATRIX  # not 3d × d: not stacked


# rule of each tensor of the tower under each merger's default table
EXPECTED_RULES = {
    "isotropic": {Kind.QKV: "spectral_blocks", Kind.MATRIX: "spectral", Kind.POSITIONAL: "spectral",
                  Kind.CONV: isotropic.CONV_DEFAULT, Kind.EMBEDDING: "mean", Kind.NORM: "mean", Kind.BIAS: "mean"},
    "opcm": {Kind.QKV: "project_blocks", Kind.MATRIX: "project", Kind.POSITIONAL: "sum", Kind.CONV: "sum",
             Kind.EMBEDDING: "sum", Kind.NORM: "sum", Kind.BIAS: "sum"},
    "opcm-fusionbench": {Kind.QKV: "project_blocks", Kind.MATRIX: "project", Kind.POSITIONAL: "sum",
                         Kind.CONV: "sum", Kind.EMBEDDING: "frozen", Kind.NORM: "sum", Kind.BIAS: "sum"},
    "ties": {k: "trim" for k in Kind},
    "sar": {Kind.QKV: "blocks", Kind.MATRIX: "matrix", Kind.POSITIONAL: "matrix", Kind.CONV: "skip",
            Kind.EMBEDDING: "skip", Kind.NORM: "skip", Kind.BIAS: "skip"},
}
TABLES = {"isotropic": isotropic.rule_table(), "opcm": opcm.rule_table(),
          "opcm-fusionbench": opcm.rule_table("fusionbench"), "ties": ties.RULES, "sar": sar.RULES}


@pytest.mark.parametrize("merger", sorted(EXPECTED_RULES))
def test_each_tensor_of_an_open_clip_tower_gets_its_rule(tower, merger):
    state = dict(tower.named_parameters())
    got = resolve(state, TABLES[merger])
    for name, rule in got.items():
        assert rule == EXPECTED_RULES[merger][EXPECTED_KINDS[short(name)]], name


def test_matrix_rules_never_reach_a_vector():
    table = isotropic.rule_table()
    assert resolve({"positional_embedding": torch.zeros(3, 4, 5)}, table) == {"positional_embedding": "mean"}


def test_qkv_split_matches_multi_head_attention():
    """Oracle: attention computed with three separate d × d projections (q, k, v blocks as written
    below) equals nn.MultiheadAttention on the stacked weight."""
    torch.manual_seed(1)
    d, heads = 8, 2
    mha = torch.nn.MultiheadAttention(d, heads)
    x = torch.randn(5, 3, d)
    packed = mha(x, x, x, need_weights=False)[0]
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = split_qkv(w)
    assert torch.equal(q, w[:d]) and torch.equal(k, w[d:2 * d]) and torch.equal(v, w[2 * d:])
    bq, bk, bv = split_qkv(b)
    separate = F.multi_head_attention_forward(
        x, x, x, d, heads, None, torch.cat([bq, bk, bv]), None, None, False, 0.0,
        mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=q, k_proj_weight=k, v_proj_weight=v)[0]
    torch.testing.assert_close(separate, packed)
    assert torch.equal(join_qkv(q, k, v), w)
    with pytest.raises(ValueError):
        split_qkv(torch.zeros(4, 2))


def _np_sar(task, merged, energy=0.95):
    u, s, _ = np.linalg.svd(merged, full_matrices=False)
    share = np.sqrt(np.cumsum(s ** 2) / np.sum(s ** 2))
    k = int(np.nonzero(share >= energy)[0][0]) + 1
    return np.linalg.norm(u[:, :k].T @ task) / np.linalg.norm(task)


@pytest.mark.parametrize("qkv", ["split", "stacked"])
def test_sar_scores_q_k_v_as_three_layers(qkv):
    rng = np.random.default_rng(0)
    merged = {"blk.attn.in_proj_weight": rng.standard_normal((12, 4)), "blk.mlp.c_fc.weight": rng.standard_normal((6, 4)),
              "blk.mlp.c_fc.bias": rng.standard_normal(6)}
    task = {k: rng.standard_normal(v.shape) for k, v in merged.items()}
    basis = sar.MergedBasis({k: torch.from_numpy(v).float() for k, v in merged.items()}, table=sar.rule_table(qkv))
    got = basis.score({k: torch.from_numpy(v).float() for k, v in task.items()})
    qkv_w = "blk.attn.in_proj_weight"
    if qkv == "split":
        layers = [(task[qkv_w][i:i + 4], merged[qkv_w][i:i + 4]) for i in (0, 4, 8)]
    else:
        layers = [(task[qkv_w], merged[qkv_w])]
    layers.append((task["blk.mlp.c_fc.weight"], merged["blk.mlp.c_fc.weight"]))
    expected = np.mean([_np_sar(t, m) for t, m in layers])
    assert got.layers == len(layers)
    assert abs(got.value - expected) < 1e-5
