"""vision20 dataset adapters on tiny local copies laid out like the real Hugging Face repositories."""

import json

import numpy as np
import pytest
import torch

from cl_merge.benchmarks.vision20 import fixtures
from cl_merge.benchmarks.vision20.benchmark import Vision20Benchmark
from cl_merge.benchmarks.vision20.specs import spec_by_name, task_specs
from cl_merge.errors import UserError

# The datasets' real layouts, typed from their dataset cards (independent of the suite's tasks.json):
# repo, config, (train, validation-or-None, test) split names, image/label columns, label type.
REAL = {
    "sun397": ("tanganke/sun397", None, ("train", None, "test"), ("image", "label"), "int"),
    "stanford_cars": ("tanganke/stanford_cars", None, ("train", None, "test"), ("image", "label"), "int"),
    "resisc45": ("tanganke/resisc45", None, ("train", None, "test"), ("image", "label"), "int"),
    "eurosat": ("tanganke/eurosat", None, ("train", None, "test"), ("image", "label"), "int"),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", ("train", None, "test"), ("image", "label"), "int"),
    "gtsrb": ("tanganke/gtsrb", None, ("train", None, "test"), ("image", "label"), "int"),
    "mnist": ("ylecun/mnist", None, ("train", None, "test"), ("image", "label"), "int"),
    "dtd": ("tanganke/dtd", None, ("train", None, "test"), ("image", "label"), "int"),
    "flowers102": ("dpdl-benchmark/oxford_flowers102", None, ("train", "validation", "test"), ("image", "label"), "int"),
    "pcam": ("1aurent/PatchCamelyon", None, ("train", "validation", "test"), ("image", "label"), "bool"),
    "fer2013": ("clip-benchmark/wds_fer2013", None, ("train", None, "test"), ("jpg", "cls"), "int"),
    "oxford_iiit_pet": ("timm/oxford-iiit-pet", None, ("train", None, "test"), ("image", "label"), "int"),
    "stl10": ("tanganke/stl10", None, ("train", None, "test"), ("image", "label"), "int"),
    "cifar100": ("tanganke/cifar100", None, ("train", None, "test"), ("image", "label"), "int"),
    "cifar10": ("tanganke/cifar10", None, ("train", None, "test"), ("image", "label"), "int"),
    "food101": ("ethz/food101", None, ("train", None, "validation"), ("image", "label"), "int"),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None, ("train", None, "test"), ("image", "label"), "int"),
    "emnist_letters": ("tanganke/emnist_letters", None, ("train", None, "test"), ("image", "label"), "int"),
    "kmnist": ("tanganke/kmnist", None, ("train", None, "test"), ("image", "label"), "int"),
    "rendered_sst2": ("nateraw/rendered-sst2", None, ("train", "validation", "test"), ("image", "label"), "int"),
}
SIZES = {"train": 10, "val": 4, "test": 5}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return fixtures.write_all(tmp_path_factory.mktemp("vision20-data"), sizes=SIZES)


def bench(root, tmp_path, **kw):
    kw.setdefault("model", "cl-merge-mini-vit")
    return Vision20Benchmark(pretrained="none", data_root=str(root), hf_cache_dir=str(tmp_path / "hf"),
                             num_workers=0, **kw)


def test_suite_specs_match_the_real_datasets():
    assert sorted(REAL) == sorted(s.name for s in task_specs())
    for spec in task_specs():
        repo, config, (train, val, test), (image, label), label_type = REAL[spec.name]
        assert (spec.hf_path, spec.hf_config) == (repo, config)
        assert (spec.train_split, spec.val_split, spec.test_split) == (train, val, test)
        assert (spec.image_column, spec.label_column, spec.label_type) == (image, label, label_type)


@pytest.mark.parametrize("name", sorted(REAL))
def test_each_adapter_loads_its_quirky_local_copy(data_root, tmp_path, name):
    task = bench(data_root, tmp_path).task(name)
    spec = spec_by_name(name)
    has_val = REAL[name][2][1] is not None
    sizes = task.metadata["sizes"]
    if has_val:  # the dataset's own validation split; train untouched
        assert sizes == {"train": 10, "val": 4, "test": 5}
        assert task.metadata["splits"]["val"] == "validation"
    else:  # 10% of train held out with a fixed seed, disjoint from train
        assert sizes == {"train": 9, "val": 1, "test": 5}
        assert not set(task.train.indices) & set(task.val.source.indices)
    assert task.classes == spec.num_classes and task.metadata["table5_id"] == spec.id
    x, y = task.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    expected = [(i + 1) % spec.num_classes for i in range(5)]  # the fixture's test labels (offset 1)
    assert [task.test[i][1] for i in range(5)] == expected
    assert task.test.labels.dtype == torch.int64
    # the cached uint8 path equals open_clip's own float preprocessing of the same image
    xt, _ = task.test[2]
    reference = task.test.source.transform(task.test.source.image(2))
    assert torch.allclose(xt, reference, atol=1e-5)
    assert task.test.images().dtype == np.uint8 and task.test.images().shape == (5, 32, 32, 3)


def test_pcam_bool_labels_become_integers(data_root, tmp_path):
    task = bench(data_root, tmp_path).task("pcam")
    assert task.train.labels.dtype == np.int64 and set(task.train.labels.tolist()) <= {0, 1}
    assert task.classnames[1].startswith("lymph node containing")


def test_food101_test_split_is_its_validation_split(data_root, tmp_path):
    task = bench(data_root, tmp_path).task("food101")
    assert task.metadata["splits"]["test"] == "validation" and len(task.test) == 5


def test_fingerprint_is_stable_and_tracks_data_and_preprocessing(data_root, tmp_path):
    a = bench(data_root, tmp_path).task("mnist")
    b = bench(data_root, tmp_path).task("mnist")
    assert a.fingerprint == b.fingerprint and a.test.key == b.test.key
    assert bench(data_root, tmp_path, test_limit=3).task("mnist").fingerprint != a.fingerprint
    assert bench(data_root, tmp_path, train_augment=False).task("mnist").fingerprint != a.fingerprint
    other = fixtures.write_all(tmp_path / "other", names=["mnist"], sizes=SIZES, seed=1)
    changed = bench(other, tmp_path).task("mnist")
    assert changed.fingerprint != a.fingerprint and changed.test.key != a.test.key


def test_eval_cache_is_written_once_atomically_and_reused(data_root, tmp_path):
    b = bench(data_root, tmp_path)
    b._cache.path = tmp_path / "cache"
    task = b.task("gtsrb")
    assert task.test.cache_file is not None and not task.test.cache_file.exists()
    first = np.array(task.test.images())
    path = task.test.cache_file
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    assert json.loads(path.with_suffix(".json").read_text())["shape"] == [5, 32, 32, 3]
    stamp = path.stat().st_mtime_ns
    again = bench(data_root, tmp_path)
    again._cache.path = tmp_path / "cache"
    task2 = again.task("gtsrb")
    assert np.array_equal(np.asarray(task2.test.images()), first) and path.stat().st_mtime_ns == stamp
    batches = list(task2.test.iter_batches(2, "cpu"))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert torch.allclose(torch.cat([x for x, _ in batches]), torch.stack([task2.test[i][0] for i in range(5)]))


def test_subsets_are_fixed_seed_and_bounded(data_root, tmp_path):
    a = bench(data_root, tmp_path, train_limit=4, test_limit=2).task("dtd")
    b = bench(data_root, tmp_path, train_limit=4, test_limit=2).task("dtd")
    assert len(a.train) == 4 and len(a.test) == 2
    assert list(a.train.indices) == list(b.train.indices)


def test_bad_data_locations_are_one_line_user_errors(data_root, tmp_path):
    with pytest.raises(UserError, match="tanganke/sun397.*benchmark.data_root"):
        Vision20Benchmark(pretrained="none", hf_cache_dir=str(tmp_path / "empty")).task("sun397")
    with pytest.raises(UserError, match="TASK=PATH"):
        Vision20Benchmark(data_paths=("sun397",))
    with pytest.raises(UserError, match="unknown task 'sun398'"):
        Vision20Benchmark(data_paths=(f"sun398={data_root}",))
    empty = tmp_path / "empty_copy"
    empty.mkdir()
    with pytest.raises(UserError, match="no 'train' split"):
        Vision20Benchmark(pretrained="none", data_paths=(f"dtd={empty}",)).task("dtd")


def test_labels_that_do_not_fit_the_class_names_are_rejected(tmp_path):
    import datasets

    root = tmp_path / "bad" / "eurosat" / "data"
    root.mkdir(parents=True)
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": [img, img], "label": [0, 12]},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "label": datasets.Value("int64")})
                                   ).to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(UserError, match="eurosat: labels span 0..12 but the task has 10 classes"):
        bench(tmp_path / "bad", tmp_path).task("eurosat")
