"""`conveyor bench --repeat N`: each row's median attempt and its range, without running a model."""

from client.bench import Row, format_table
from client.engine_comparisons import spread


def _row(name: str, tokens_per_s: float, ttft_s: float) -> Row:
    return Row(name, 2, 100, 100 / tokens_per_s, [ttft_s, ttft_s], [0.05, 0.05])


def test_a_repeated_row_shows_its_median_attempt_and_the_lowest_and_highest_rate() -> None:
    attempts = [
        [_row("ours", 200.0, 1.0), _row("theirs", 150.0, 3.0)],
        [_row("ours", 250.0, 2.0), _row("theirs", 140.0, 4.0)],
        [_row("ours", 100.0, 9.0), _row("theirs", 160.0, 5.0)],
    ]
    lines = format_table(attempts, None).splitlines()
    assert "min-max" in lines[0]
    ours, theirs = lines[2].split(), lines[3].split()
    assert ours == ["ours", "2", "100", "200.0", "100-250", "-", "1.00s", "1.00s", "50.0"]
    assert theirs[3:5] == ["150.0", "140-160"] and theirs[6] == "3.00s"


def test_a_row_measured_once_shows_no_range() -> None:
    line = format_table([[_row("once", 120.0, 1.5)]], None).splitlines()[2].split()
    assert line[3:5] == ["120.0", "-"]


def test_spread_gives_the_median_and_the_range_when_there_is_one() -> None:
    assert spread([3.0, 1.0, 2.0], ".1f") == "2.0 (1.0..3.0)"
    assert spread([-1.5, 4.0], ".1f") == "1.2 (-1.5..4.0)"
    assert spread([7.0], ".0f") == "7"
