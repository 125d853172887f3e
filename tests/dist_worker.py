"""`qwen3lab train` as torchrun starts it, with test hooks:
- QWEN3LAB_TEST_FAIL_AFTER=N makes rank 0 die right after logging step N, as a preempted or crashed worker would;
- QWEN3LAB_TEST_ROWS=FILE appends, on rank 0, the global rows of every training micro-batch (one JSON list a line);
- QWEN3LAB_TEST_LOAD_RSS=FOLDER ends the run once the model is loaded and sharded, each rank writing rank-R.json:
  its RSS before the model was built and its peak RSS (ru_maxrss) since, in bytes."""

import importlib
import json
import os
import resource
from pathlib import Path

from qwen3lab.cli import main
from qwen3lab.train.report import Reporter

T = importlib.import_module("qwen3lab.train.build")  # where the run is built (patched below)

fail_after = int(os.environ.get("QWEN3LAB_TEST_FAIL_AFTER", "0"))
if fail_after:
    log = Reporter.log

    def log_then_fail(self, metrics):
        log(self, metrics)
        if metrics["step"] == fail_after:
            raise RuntimeError(f"injected failure of rank 0 after step {fail_after}")

    Reporter.log = log_then_fail

if os.environ.get("QWEN3LAB_TEST_ROWS"):
    S = importlib.import_module("qwen3lab.train.stages")  # where training micro-batches are made
    rank_batch = S.rank_batch

    def logged_rank_batch(data, rows, d, *args, **kwargs):
        if d.rank == 0:
            with open(os.environ["QWEN3LAB_TEST_ROWS"], "a") as f:
                f.write(json.dumps(rows) + "\n")
        return rank_batch(data, rows, d, *args, **kwargs)

    S.rank_batch = logged_rank_batch

if os.environ.get("QWEN3LAB_TEST_LOAD_RSS"):
    folder, before = Path(os.environ["QWEN3LAB_TEST_LOAD_RSS"]), []
    build_model = T.build_model

    def measured_build_model(*args, **kwargs):
        before.append(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        return build_model(*args, **kwargs)

    def stop_after_loading(net, *args, **kwargs):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (folder / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"before": before[0], "peak": peak}))
        raise SystemExit(0)

    T.build_model = measured_build_model
    T.build_optimizer = stop_after_loading

main()
