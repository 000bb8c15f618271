import os
import subprocess
import sys
import textwrap

from cl_merge.registry import LEARNERS, MERGERS, STRATEGIES


def test_builtins_are_registered():
    assert {"c-ft", "c-ta", "swa"} <= set(STRATEGIES.names())
    assert {"adam"} <= set(LEARNERS.names())
    assert {"identity", "task_arithmetic", "swa"} <= set(MERGERS.names())
    for name in STRATEGIES.names():  # every strategy names registered components
        s = STRATEGIES.get(name)
        assert s.learner in LEARNERS and s.merger in MERGERS


def test_third_party_strategy_registers_through_the_entry_point_group(tmp_path):
    (tmp_path / "my_cl_plugin.py").write_text(textwrap.dedent("""
        import dataclasses
        from cl_merge.merger import Merger
        from cl_merge.params import combine
        from cl_merge.registry import register_merger, register_strategy

        def register():
            @register_merger
            @dataclasses.dataclass
            class HalfMerger(Merger):
                name = "half"
                def merge(self, base, previous, expert, start, step):
                    return combine(lambda p, e: 0.5 * (p + e), previous, expert)
            register_strategy("half-adam", "adam", "half", "independent")
    """))
    dist = tmp_path / "my_cl_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-cl-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cl_merge.strategies]\nhalf = my_cl_plugin:register\n")
    code = ("from cl_merge.config import resolve; c = resolve('mini', strategy='half-adam');"
            "print(c.learner, c.merger, c.protocol)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["adam", "half", "independent"]
