import subprocess
import sys


def test_cl_merge_import_makes_torchvision_open_clip_and_avalanche_importable():
    code = ("import cl_merge, torchvision, open_clip; import avalanche.training.plugins as t;"
            "print(hasattr(t, 'EWCPlugin') and hasattr(t, 'ReplayPlugin'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
