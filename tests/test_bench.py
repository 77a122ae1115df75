from eval.bench import percentiles


def test_nearest_rank_percentiles_by_hand():
    values = list(range(1, 101))  # 1..100
    assert percentiles(values) == {"p50": 50, "p95": 95, "p99": 99, "n": 100}
    assert percentiles([3.0, 1.0, 2.0]) == {"p50": 2.0, "p95": 3.0, "p99": 3.0, "n": 3}
    assert percentiles([7.0])["p99"] == 7.0

def test_bench_runs_every_path(composer):
    from eval.bench import format_report, run_bench

    report = run_bench(composer, users=4, batch_size=2, validity_users=4, progress=False)
    for path in ("llm", "deterministic", "cache"):
        assert report[path]["latency_ms"]["p50"] > 0
    assert report["cache"]["latency_ms"]["p99"] < report["llm"]["latency_ms"]["p50"]
    assert report["validity"]["pages"] == 4 and report["validity"]["violations_in_returned_pages"] == 0
    assert "pages/min" in format_report(report)
