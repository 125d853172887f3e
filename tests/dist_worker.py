"""`qwen3lab train` as torchrun starts it, with one test hook: QWEN3LAB_TEST_FAIL_AFTER=N makes rank 0 die right
after logging step N, as a preempted or crashed worker would."""

import os

from qwen3lab.cli import main
from qwen3lab.train import Reporter

fail_after = int(os.environ.get("QWEN3LAB_TEST_FAIL_AFTER", "0"))
if fail_after:
    log = Reporter.log

    def log_then_fail(self, metrics):
        log(self, metrics)
        if metrics["step"] == fail_after:
            raise RuntimeError(f"injected failure of rank 0 after step {fail_after}")

    Reporter.log = log_then_fail

main()
