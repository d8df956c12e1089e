"""benchmarks/quality/bench.py --quick: the KnOTS quality benchmark end to end on the real SmolLM2 base
(converted from the packaged GGUF), two demo tasks, a few prompts, through the vLLM pinning path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_quality_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    # float32: on a CPU without AVX512-BF16 (this CI machine) vLLM's bf16 path is ~6x slower
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/quality/bench.py"),
            "--quick",
            "--stats-curve",
            "2",
            "--sketch-curve",
            "8",
            "--layerwise",
            "2",
            "--eager",
            "--dtype",
            "float32",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert tasks == ["sentiment", "last_word"]
    for t in tasks:  # each LoRA beats the base model on its own task, through the pinning path
        assert res["lora_test"][t] > res["base"][t], (t, res["lora_test"][t], res["base"][t])
    old = {"ta", "ties", "dare-ties", "knots-ties", "knots-dare-ties", "core-ties"}
    assert set(res["methods"]) == old | {
        "iso-c",
        "iso-cts",
        "tsv",
        "cart",
        "core-doge",
        "regmean",
        "core-regmean",
        "wudi",
    }
    assert set(res["stats_curve"]) == {"regmean", "core-regmean"} and set(res["stats_curve"]["regmean"]) == {"2"}
    assert set(res["sketch_curve"]["core-regmean"]) == {"8"} and 0 < res["sketch_bytes"]["8"]
    assert res["layerwise"]["n"] == 2 and res["layerwise"]["regmean"] == res["stats_curve"]["regmean"]["2"]
    for method, r in res["methods"].items():
        for setting in ("per_task", "joint"):
            chosen = r[setting]
            # the search ran on val over the quick grid, and picked the best point it tried
            assert chosen["val"] == max(score for _, score in chosen["search"])
            assert len(chosen["test"]) == (2 if "dare" in method else 1)  # DARE: one test run per seed
    assert set(res["scale"]) == set(res["methods"]) | {"knots-ties (subset basis)", "knots-ties (auto basis)"}
    # with every task merged, the subset basis is the shared one: the same merge, the same answers
    assert res["scale"]["knots-ties (subset basis)"]["2"] == res["scale"]["knots-ties"]["2"]
    assert res["scale"]["knots-ties (auto basis)"]["2"] == res["scale"]["knots-ties"]["2"]  # auto: shared here
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "Per-task setting" in (out / "results.md").read_text()
        and "Examples per task" in (out / "results.md").read_text()
    )
