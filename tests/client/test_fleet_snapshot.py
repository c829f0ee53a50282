"""Histogram arithmetic the monitor's latency percentiles rest on (as Prometheus' histogram_quantile)."""

import pytest

from client.fleet_snapshot import Histogram, parse_histograms

INF = float("inf")


def test_quantile_interpolates_inside_the_bucket_that_holds_the_rank() -> None:
    histogram = Histogram(((0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (INF, 20.0)), 20.0)
    assert histogram.quantile(0.5) == pytest.approx(0.5)
    assert histogram.quantile(0.25) == pytest.approx(0.3)
    assert histogram.quantile(0.75) == pytest.approx(0.75)


def test_quantile_in_the_open_bucket_is_the_last_finite_bound() -> None:
    histogram = Histogram(((1.0, 1.0), (INF, 4.0)), 4.0)
    assert histogram.quantile(0.99) == 1.0


def test_quantile_of_nothing_is_none() -> None:
    assert Histogram(((1.0, 0.0), (INF, 0.0)), 0.0).quantile(0.5) is None


def test_minus_leaves_what_was_observed_since() -> None:
    before = Histogram(((1.0, 3.0), (2.0, 5.0), (INF, 5.0)), 5.0)
    after = Histogram(((1.0, 3.0), (2.0, 9.0), (INF, 10.0)), 10.0)
    recent = after.minus(before)
    assert recent == Histogram(((1.0, 0.0), (2.0, 4.0), (INF, 5.0)), 5.0)
    assert recent.quantile(0.5) == pytest.approx(1.625)


def test_plus_adds_two_processes_and_nothing_to_an_empty_one() -> None:
    first = Histogram(((1.0, 3.0), (INF, 5.0)), 5.0)
    second = Histogram(((1.0, 1.0), (INF, 4.0)), 4.0)
    assert first.plus(second) == Histogram(((1.0, 4.0), (INF, 9.0)), 9.0)
    assert Histogram((), 0.0).plus(first) == first


def test_parse_sums_labels_and_keeps_only_the_shown_histograms() -> None:
    page = """# TYPE conveyor:e2e_request_latency_seconds histogram
conveyor:e2e_request_latency_seconds_bucket{le="1.0",model_name="a"} 1.0
conveyor:e2e_request_latency_seconds_bucket{le="+Inf",model_name="a"} 2.0
conveyor:e2e_request_latency_seconds_bucket{le="1.0",model_name="b"} 3.0
conveyor:e2e_request_latency_seconds_bucket{le="+Inf",model_name="b"} 3.0
conveyor:e2e_request_latency_seconds_count{model_name="a"} 2.0
conveyor:e2e_request_latency_seconds_count{model_name="b"} 3.0
conveyor:e2e_request_latency_seconds_sum{model_name="a"} 2.5
# TYPE conveyor:request_queue_time_seconds histogram
conveyor:request_queue_time_seconds_bucket{le="+Inf",model_name="a"} 2.0
conveyor:request_queue_time_seconds_count{model_name="a"} 2.0
"""
    assert parse_histograms(page) == {"e2e_request_latency_seconds": Histogram(((1.0, 4.0), (INF, 5.0)), 5.0)}
