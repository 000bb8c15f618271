"""strategies/ and benchmarks/ install under the cl_merge namespace, for plain and editable installs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = ("import json, cl_merge, cl_merge.strategies, cl_merge.benchmarks, cl_merge.benchmarks.mini.benchmark as m;"
         "import importlib.util as u;"
         "print(json.dumps({'strategies': cl_merge.strategies.__file__, 'benchmarks': cl_merge.benchmarks.__file__,"
         "'weights': str(m.HERE), 'generic': [n for n in ('strategies', 'benchmarks') if u.find_spec(n)]}))")


def probe(cwd, pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editable_install_maps_the_top_level_folders(tmp_path):
    info = probe(cwd=tmp_path)  # outside the repo: only the installed mapping can resolve these
    assert Path(info["strategies"]).parent == ROOT / "strategies"
    assert Path(info["benchmarks"]).parent == ROOT / "benchmarks"
    assert info["generic"] == []


@pytest.mark.slow
def test_plain_install_puts_them_under_cl_merge_only(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    assert not (target / "strategies").exists() and not (target / "benchmarks").exists()
    assert (target / "cl_merge" / "strategies" / "catalog.py").exists()
    weights = list((target / "cl_merge" / "benchmarks" / "mini" / "weights").glob("*.safetensors"))
    assert weights, "the mini suite's pre-trained weights must ship in the wheel"
    assert (target / "cl_merge" / "py.typed").exists(), "the package declares its type hints (PEP 561)"
    dist = next(target.glob("cl_merge-*.dist-info"))
    meta = (dist / "METADATA").read_text()
    assert "Summary: Continual learning x model merging" in meta and "Keywords:" in meta
    assert "Classifier: Typing :: Typed" in meta
    info = probe(cwd=tmp_path, pythonpath=target)
    assert Path(info["strategies"]).is_relative_to(target)
    assert Path(info["weights"]).is_relative_to(target)
    assert info["generic"] == []
