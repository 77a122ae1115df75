"""Offline evaluation: splits, ranking metrics, baselines, judge suites, reports, benchmarks."""
