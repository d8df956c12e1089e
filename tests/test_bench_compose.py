"""benchmarks/compose.py --quick: the sampled exact selection equals torch.kthvalue, and the script runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compose_benchmark_quick_mode():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compose.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kth_smallest == torch.kthvalue" in r.stdout
    assert r.stdout.count("\n| 8 |") == 2  # rank 8, two subset sizes
