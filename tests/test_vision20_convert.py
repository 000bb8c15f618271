"""FusionBench HF-CLIP vision checkpoints -> open_clip image towers: converted outputs match HF's."""

import json

import pytest
import torch

import cl_merge  # noqa: F401  (the torchvision shim must precede transformers/open_clip)

transformers = pytest.importorskip("transformers")

import open_clip  # noqa: E402

from cl_merge.benchmarks.vision20.convert_hf_clip import convert_tasks, hf_to_open_clip_visual  # noqa: E402
from cl_merge.benchmarks.vision20.experts import load_expert  # noqa: E402
from cl_merge.errors import UserError  # noqa: E402

WIDTH, LAYERS, HEADS, PATCH, SIZE, EMBED = 64, 2, 4, 8, 32, 24


def hf_config(act="quick_gelu"):
    return transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
                                         projection_dim=EMBED, hidden_act=act)


def randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():  # move layer norms etc. away from their identity init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def oc_name(tmp_path_factory):
    """A small open_clip config matching the HF vision config (and a QuickGELU-less twin)."""
    root = tmp_path_factory.mktemp("ocfg")
    for name, quick in (("v20-convert-tiny", True), ("v20-convert-tiny-gelu", False)):
        cfg = {"embed_dim": EMBED, "quick_gelu": quick,
               "vision_cfg": {"image_size": SIZE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                              "patch_size": PATCH, "mlp_ratio": 2.0},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
    return "v20-convert-tiny"


def open_clip_model(name):
    return open_clip.create_model(name, pretrained=None).eval()


def test_converted_tower_matches_hf_with_projection(oc_name):
    hf = randomize(transformers.CLIPVisionModelWithProjection(hf_config()))
    model = open_clip_model(oc_name)
    reference = {k: p.detach().clone() for k, p in model.visual.named_parameters()}
    state = hf_to_open_clip_visual(hf.state_dict(), reference)
    assert set(state) == set(reference)
    assert not torch.equal(state["proj"], reference["proj"])  # HF's projection, not the reference's
    model.visual.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf(pixel_values=x).image_embeds
        got = model.encode_image(x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    # the test can fail: GELU instead of QuickGELU gives different outputs
    gelu = open_clip_model("v20-convert-tiny-gelu")
    gelu.visual.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert (gelu.encode_image(x) - expected).abs().max() > 1e-3


def test_vision_model_without_projection_takes_the_pretrained_projection(oc_name, tmp_path):
    hf = randomize(transformers.CLIPVisionModel(hf_config()))
    open_clip_model(oc_name)  # registers the tiny config that the conversion below reads
    with pytest.raises(UserError, match="no visual_projection"):
        hf_to_open_clip_visual(hf.state_dict())

    # through files, as the command does: HF folder -> safetensors expert -> load_expert -> adapter state
    hf.save_pretrained(tmp_path / "hf_mnist")
    cfg_path = tmp_path / "v20-convert-file.json"
    cfg_path.write_text(json.dumps(open_clip.get_model_config(oc_name)))
    manifest = convert_tasks(str(cfg_path), tmp_path / "experts", ["mnist"], str(tmp_path / "hf_{task}"), None)
    assert manifest["mnist"]["file"] == "mnist.safetensors"
    base = open_clip.create_model("v20-convert-file", pretrained=None).eval()
    assert json.loads((tmp_path / "experts" / "manifest.json").read_text())["experts"]["mnist"]["source"].endswith(
        "hf_mnist")
    expert = load_expert(tmp_path / "experts", "mnist", {k: p.detach() for k, p in base.visual.named_parameters()})
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        pooled = hf(pixel_values=x).pooler_output
        base.visual.load_state_dict(expert, strict=True)
        got = base.encode_image(x)
    # the tower is HF's; the projection is the θ0 that convert_tasks built (FusionBench never tuned it)
    assert torch.allclose(got, pooled @ expert["proj"], atol=1e-5)


def test_mismatched_architectures_and_missing_experts_are_user_errors(oc_name, tmp_path):
    wide = transformers.CLIPVisionConfig(hidden_size=2 * WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
                                         projection_dim=EMBED, hidden_act="quick_gelu")
    hf = transformers.CLIPVisionModelWithProjection(wide)
    reference = {k: p.detach() for k, p in open_clip_model(oc_name).visual.named_parameters()}
    with pytest.raises(UserError, match="has shape"):
        hf_to_open_clip_visual(hf.state_dict(), reference)
    with pytest.raises(UserError, match="not a Hugging Face CLIP vision checkpoint"):
        hf_to_open_clip_visual({"foo.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="no expert for task dtd"):
        load_expert(tmp_path, "dtd", reference)
