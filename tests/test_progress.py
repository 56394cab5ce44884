"""Progress bars of the data stages (stages/lib/progress.py)."""
import io
import sys

from stages.lib.progress import progress_bar


def test_without_a_terminal_the_bar_only_counts(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar("clean") as bar:
        bar.update(5)
        bar.update()
    assert bar.n == 6 and sys.stderr.getvalue() == ""


def test_on_a_terminal_it_is_tqdm(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    from tqdm import tqdm

    with progress_bar("split: write", total=3) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "split: write" in sys.stderr.getvalue()
