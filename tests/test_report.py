"""Tables and progress lines (sdpo.report)."""
import io

from sdpo import report


def test_format_table():
    assert report.format_table(["a", "bb"], [["x", 0.5], ["yyy", None]]) == (
        "| a   | bb     |\n|-----|--------|\n| x   | 0.5000 |\n| yyy | —      |")


def test_progress_lines_in_a_log_file():
    buf = io.StringIO()
    bar = report.Progress("arc", 10, stream=buf, interval=1e9)
    bar.update(4)
    bar.update(6)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arc: 10/10 (")  # only the final line, no '\r'
