"""vision20 backbones: ViT-B-32 builds offline with random weights, builds zero-shot heads from the real
class names/templates, evaluates through the uint8 cache; missing weights are clear UserErrors."""

import dataclasses

import pytest
import torch

from cl_merge.benchmarks.vision20 import fixtures
from cl_merge.benchmarks.vision20.benchmark import Vision20Benchmark
from cl_merge.benchmarks.vision20.model import create_clip, preprocess_for, use_quick_gelu
from cl_merge.benchmarks.vision20.specs import spec_by_name
from cl_merge.errors import UserError
from cl_merge.models.clip import ClipClassifier


@pytest.fixture(scope="module")
def vitb32(tmp_path_factory):
    root = tmp_path_factory.mktemp("v20model")
    fixtures.write_all(root / "data", names=["sun397"], sizes={"train": 4, "test": 4})
    bench = Vision20Benchmark(model="ViT-B-32", pretrained="none", data_root=str(root / "data"),
                              hf_cache_dir=str(root / "hf"), num_workers=0)
    adapter = bench.build_model(cache_dir=root / "cache", device="cpu", eval_batch_size=3)
    return bench, adapter, root


def test_vit_b32_random_init_builds_heads_from_real_classnames_and_evaluates(vitb32):
    bench, adapter, root = vitb32
    assert isinstance(adapter, ClipClassifier) and adapter.model_id == "open_clip:ViT-B-32/random-init"
    assert adapter.precision == "fp32"  # CPU: no autocast
    visual = adapter.trainable_parameters()
    assert "conv1.weight" in visual and tuple(visual["conv1.weight"].shape) == (768, 3, 32, 32)
    assert all(p.requires_grad for p in visual.values())
    assert not any(p.requires_grad for n, p in adapter.model.named_parameters() if not n.startswith("visual."))

    task = bench.task("sun397")
    spec = spec_by_name("sun397")
    task = dataclasses.replace(task, classnames=spec.classnames[:3])  # a few real classes, real templates
    assert task.templates == ("a photo of a {}.", "a photo of the {}.")
    head = adapter.head(task)
    assert head.shape == (3, 512)
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert len(list((root / "cache" / "heads").glob("sun397-*.safetensors"))) == 1

    images = torch.stack([task.test[i][0] for i in range(4)])
    labels = torch.tensor([task.test[i][1] for i in range(4)])
    assert images.shape == (4, 3, 224, 224)
    with torch.no_grad():
        logits = adapter.logits(images, task)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    acc = adapter.evaluate(task)  # batched over the uint8 cache (batch 3: two batches for 4 images)
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert list((root / "cache" / "vision20-eval").glob("sun397-test-*.npy"))


def test_preprocessing_matches_open_clip_and_openai_weights_use_quick_gelu(vitb32):
    bench, adapter, _ = vitb32
    pp = preprocess_for("ViT-B-32", "openai")
    assert pp == bench.preprocess() and pp.size == 224 and pp.interpolation == "bicubic"
    assert use_quick_gelu("ViT-B-32", "openai", None) is True
    assert use_quick_gelu("ViT-B-32", None, None) is True
    assert use_quick_gelu("ViT-B-32", "openai", False) is False
    assert type(adapter.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_missing_weights_are_user_errors_naming_the_fix(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        create_clip("ViT-B-32", str(tmp_path / "nope.bin"), None)
    with pytest.raises(UserError, match="no 'imagenet' weights"):
        create_clip("ViT-B-32", "imagenet", None)
    with pytest.raises(UserError, match="unknown open_clip model"):
        Vision20Benchmark(model="ViT-X-99").model_name
    from huggingface_hub import try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", f), str)
                 for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    if cached:
        pytest.skip("OpenAI ViT-B-32 weights are cached on this machine")
    with pytest.raises(UserError, match="benchmark.pretrained=/path/to/open_clip_pytorch_model.bin"):
        create_clip("ViT-B-32", "openai", None)


def test_a_local_checkpoint_loads_into_the_architecture(tmp_path):
    from cl_merge.benchmarks.vision20.model import resolve_model_name

    name = resolve_model_name("cl-merge-mini-vit")
    model = create_clip(name, None, None)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    again = create_clip(name, str(path), None)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="could not load"):
        create_clip(name, str(tmp_path / "bad.pt"), None)
