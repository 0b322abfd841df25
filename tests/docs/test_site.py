"""The documentation site: it builds with --strict, its CLI reference covers every verb and option,
README.md stays short, and no result figure is typed by hand (all come from benchmarks/results)."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _results_hook():
    """docs_hooks/results.py, the MkDocs hook (a file, not a package)."""
    spec = importlib.util.spec_from_file_location("docs_results_hook", ROOT / "docs_hooks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# What a measured result looks like in prose: a percentage, a ratio such as 0.93x, a duration, a size,
# a rate, or accuracy points. Settings (T = 512, --latency-budget 1.05, 5-fold) do not match.
FIGURE = re.compile(
    r"\d(?:[\d,]*\d)?(?:\.\d+)?\s?(?:%|x\b|(?:ms|s|sec|seconds?|minutes?|min|hours?|MB|MiB|GB|GiB|kB|KB)\b"
    r"|(?:req|requests|images)/s\b|points\b)")


def typed_figures(text: str) -> list[str]:
    """The lines of `text` (outside generated results regions) that carry a result-like figure."""
    hook = _results_hook()
    return [line for line in hook.strip_generated(text).splitlines() if FIGURE.search(line)]


def documentation_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_site_builds_strict_without_warnings(built_site):
    _, log = built_site
    assert not [line for line in log.splitlines() if "WARNING" in line], log


def test_every_page_is_in_the_site(built_site):
    site, _ = built_site
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / ("index.html" if rel.name == "index" else rel / "index.html")
        assert built.is_file(), f"{page} was not built"


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield path + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))


def test_cli_reference_lists_every_verb_and_option(built_site):
    from h2t_edge.cli import cli

    site, _ = built_site
    page = (site / "reference" / "cli" / "index.html").read_text()
    headings = [(m.start(), m.group(1)) for m in re.finditer(r'<h\d id="(h2t-edge[\w-]*)"', page)]
    ends = [start for start, _ in headings[1:]] + [len(page)]
    sections = {anchor: page[start:end] for (start, anchor), end in zip(headings, ends)}
    missing = []
    for path, command in [((), cli), *_commands(cli)]:
        anchor = "-".join(("h2t-edge",) + path)
        if anchor not in sections:
            missing.append(f"h2t-edge {' '.join(path)}: no section")
            continue
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                missing += [f"h2t-edge {' '.join(path)} {opt}" for opt in param.opts if opt not in sections[anchor]]
    assert not missing, missing
    assert len(headings) > 20


def test_no_result_figure_is_typed_by_hand():
    offending = [f"{page.relative_to(ROOT)}: {line.strip()}" for page in documentation_pages()
                 for line in typed_figures(page.read_text())]
    assert not offending, ("result figures typed by hand (render them from benchmarks/results/*.json with a "
                           "<!-- results NAME --> marker, docs_hooks/results.py):\n" + "\n".join(offending))


def test_the_figure_check_finds_typed_figures():
    typed = ("HEAD2TOE reaches 86.8% here\nand runs at 0.93x the backbone\nin 54 s\nor 4.03 ms\n"
             "a 2.5 MB head\n219 req/s\n18.7 points better\n")
    assert len(typed_figures(typed)) == 7
    settings = "h2t-edge train data -T 512 --latency-budget 1.05 --grid quick\n5-fold CV, ed25519, x86_64, 1e-4\n"
    assert typed_figures(settings) == []
    generated = "<!-- results headline -->\n| a | 86.8% |\n<!-- end results -->\n"
    assert typed_figures(generated) == []


def test_readme_results_are_the_current_rendering():
    hook = _results_hook()
    readme = (ROOT / "README.md").read_text()
    assert "<!-- results headline -->" in readme
    assert hook.expand(readme) == readme, "README.md's results are stale: run `python docs_hooks/results.py`"


def test_readme_is_short_and_keeps_the_fresh_machine_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    for marker in ("# demo:", "# test data:", "# tests:"):
        assert any(line.startswith(marker) for line in lines), marker  # .ci/run reads the line after each


def test_every_results_marker_names_a_figure():
    hook = _results_hook()
    for page in documentation_pages():
        for name in hook.MARKER.findall(page.read_text()):
            assert name in hook.FIGURES, f"{page}: unknown results figure {name!r}"
