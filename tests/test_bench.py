import pytest

from eval.bench import percentiles

pytestmark = pytest.mark.one_engine


def test_nearest_rank_percentiles_by_hand():
    values = list(range(1, 101))  # 1..100
    assert percentiles(values) == {"p50": 50, "p95": 95, "p99": 99, "n": 100}
    assert percentiles([3.0, 1.0, 2.0]) == {"p50": 2.0, "p95": 3.0, "p99": 3.0, "n": 3}
    assert percentiles([7.0])["p99"] == 7.0

@pytest.mark.slow
def test_bench_runs_every_path(composer):
    from eval.bench import format_report, run_bench

    report = run_bench(composer, users=4, batch_size=2, validity_users=4, progress=False)
    for path in ("llm", "deterministic", "cache"):
        assert report[path]["latency_ms"]["p50"] > 0
    assert report["cache"]["latency_ms"]["p99"] < report["llm"]["latency_ms"]["p50"]
    assert report["validity"]["pages"] == 4 and report["validity"]["violations_in_returned_pages"] == 0
    assert "pages/min" in format_report(report)


@pytest.mark.slow
def test_bench_times_the_earlier_configuration_beside(settings, composer):
    from agent.service import composer_for
    from eval.bench import earlier, format_report, run_bench

    before = composer_for(earlier(settings), composer.retriever, composer.backend)
    report = run_bench(composer, users=4, batch_size=2, validity_users=0, progress=False, before=before)
    now, then = report["llm"], report["llm_before"]
    assert now["latency_ms"]["n"] == then["latency_ms"]["n"] == 4
    # shorter candidate lines and one step per module's order instead of one per item
    assert now["prompt_tokens_per_page"] < then["prompt_tokens_per_page"]
    assert now["forward_passes_per_page"] < then["forward_passes_per_page"]
    assert "LLM path before" in format_report(report)
