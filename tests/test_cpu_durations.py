"""--cpu-durations: CPU per test, a waited-for subprocess's included, listed most first."""

from __future__ import annotations

INNER = '''
import subprocess, sys, time

def test_burns_cpu_in_a_subprocess():
    subprocess.run([sys.executable, "-c", "x = 0\\nfor i in range(3_000_000): x += i"], check=True)

def test_sleeps():
    time.sleep(0.3)
'''


def test_a_subprocess_s_cpu_counts_and_the_list_is_most_first(pytester):
    pytester.makepyfile(test_inner=INNER)
    rows_file = pytester.path / "rows.tsv"
    result = pytester.runpytest("-p", "tests.cpu_durations", "--cpu-durations=0", f"--cpu-durations-file={rows_file}")
    result.assert_outcomes(passed=2)
    rows = {line.split("\t")[2]: (float(line.split("\t")[0]), float(line.split("\t")[1]))
            for line in rows_file.read_text().splitlines()}
    burn, sleep = rows["test_inner.py::test_burns_cpu_in_a_subprocess"], rows["test_inner.py::test_sleeps"]
    assert burn[0] >= 0.1 and sleep[0] < burn[0] and sleep[1] >= 0.3  # CPU, not wall: the sleep costs none
    listed = [line for line in result.outlines if "s cpu" in line]
    assert "test_burns_cpu_in_a_subprocess" in listed[0] and "test_sleeps" in listed[1]
    assert any(line.startswith("=") and "most CPU" in line for line in result.outlines)


def test_nothing_is_listed_without_the_option(pytester):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "tests.cpu_durations")
    result.assert_outcomes(passed=2)
    assert not any("most CPU" in line for line in result.outlines)
