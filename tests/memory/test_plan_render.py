"""Issue 28: a printed plan reads as a plan (titles), says only where its figures really are, and its verdict lines
wrap between phrases, not inside them."""

import io
import re

from rich.console import Console

from lightning_lowrank import plan
from lightning_lowrank.memory.plan import wrap_line


def _render(result, width=80, **options):
    console = Console(file=io.StringIO(), width=width)
    result.render(console, **options)
    return console.file.getvalue()


def test_planned_tables_say_planned_in_their_titles():
    text = _render(plan("60M", rank=128, gpu_gib=24), collapse=False)
    titles = [
        line.strip() for line in text.splitlines() if line.startswith(("Low-rank", "By module", "Optimizer state by"))
    ]
    assert titles[0].startswith("Low-rank optimizer memory (planned, before training):")
    assert "By module group (planned, before training)" in titles
    assert "Optimizer state by kind (planned, before training)" in titles


def test_collapsed_plan_does_not_promise_a_json_file_or_metrics():
    text = _render(plan("60M", rank=128))  # more than 40 layers: shown by module group
    header = " ".join(text.split("By module group")[0].split())
    assert "shown by module group" in header and "planned" in header
    assert "JSON" not in header and "logged metrics" not in header
    assert "render(collapse=False)" in header


def test_verdict_lines_wrap_between_phrases_within_the_width():
    text = _render(plan("60M", rank=128, gpu_gib=80, layerwise=True))
    verdict = text[text.index("Fits a 80.00 GiB GPU?") :].splitlines()
    assert all(len(line) <= 80 for line in verdict)
    assert len(re.findall(r"\([\d.]+ [KMG]iB left for activations\)", text)) == 2  # each whole on one line
    assert not any(line.rstrip().endswith(("left for", "(", "->")) for line in verdict)
    assert "  with low-rank state, layer-wise:" in text  # the row's label stays at the start of its line


def test_wrap_line_keeps_parentheses_whole_and_indents_what_follows():
    line = "  with low-rank state, layer-wise: 3.45 GiB -> FITS (76.55 GiB left for activations)"
    assert wrap_line(line, 80) == [
        "  with low-rank state, layer-wise: 3.45 GiB -> FITS",
        "      (76.55 GiB left for activations)",
    ]
    assert wrap_line(line, 200) == [line]
    paragraph = "word " * 30 + "(a parenthesis far longer than the width it has to fit in, so broken between its words)"
    lines = wrap_line(paragraph.strip(), 40)
    assert all(len(part) <= 40 for part in lines) and " ".join(lines).split() == paragraph.split()
