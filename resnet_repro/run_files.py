"""Names of the files a run directory and a sweep directory hold (the run-directory contract), in one place."""

METRICS_NAME = "metrics.json"  # a finished run: written last and atomically; a rerun skips the run
FAILED_NAME = "failed.json"  # a failed run: the error and its traceback
SUMMARY_JSON = "sweep_summary.json"  # a sweep directory: what became of each planned run (written at the end)
PLAN_JSON = "sweep_plan.json"  # a sweep directory: the planned run directories (written at the start)
SUMMARY_LOG = "sweeps.log"  # a sweep directory: every summary, appended
