"""The size rule of the package (issue 14): a reader holds a whole file in their head.

Classes have no cap (issue 24): a class is as long as its one job needs; code is split by job, never to fit a count.
"""

from tests import ROOT

PACKAGE = ROOT / "lightning_lowrank"
MAX_FILE_LINES = 400


def test_no_file_over_400_lines():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {lines} lines")
    assert not too_long, too_long
