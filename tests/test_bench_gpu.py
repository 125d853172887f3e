"""bench/gpu.py runs end to end (a tiny shape on the CPU), so it is ready the day a GPU is lent."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_gpu_bench_smoke_runs_on_cpu():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "dense  == per-document sdpa" in out and "auto picks sdpa" in out
    assert "full FT" in out and "LoRA r16" in out and "MFU" in out
    assert "QLoRA r16 (NF4 base, fp32, 512 tokens, block inputs offloaded)" in out
    assert "batch-1 decode" in out
