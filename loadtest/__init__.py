"""Async load generator for OpenAI-compatible servers: metrics, reports, charts, benchmark.

Python API::

    from loadtest import LoadTestConfig, run, write_report

    result = run(LoadTestConfig(url="http://127.0.0.1:8000", concurrency=[1, 8]))
    write_report(result, "out/")

CLI: ``python -m loadtest --help`` (or ``retort loadtest``); ``python -m loadtest.bench``
runs the published benchmark.
"""

from loadtest.report import write_report
from loadtest.runner import LoadTestConfig, LoadTestError, LoadTestResult, run, run_loadtest
from loadtest.stats import LevelMetrics, RequestResult, Summary

__all__ = [
    "LevelMetrics",
    "LoadTestConfig",
    "LoadTestError",
    "LoadTestResult",
    "RequestResult",
    "Summary",
    "run",
    "run_loadtest",
    "write_report",
]
