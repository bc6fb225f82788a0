"""The GPU check runs on the CPU as a dry run, so that it cannot rot before a GPU runs it."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--models", "vit_small_patch16_224", "--batches", "2", "--rounds", "1", "--T", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert not report["errors"] and report["all_bf16_ok"]
    (result,) = report["results"]
    cost = result["cost"]["batch2"]
    assert set(cost["ratio_to_T_ann_forwards"]) == {"step", "multi"} and not cost["errors"]
    assert cost["multi_vs_step"]["bit_identical"]  # on CPU, multi-step mode is step mode bit for bit
    assert all(a["rel"] == 0.0 for a in result["agreement_with_cpu"].values())
