"""The labeling guideline: a versioned Markdown file, shipped with the package, rendered for
Label Studio's instructions; bad files get a clear error."""

from __future__ import annotations

import pytest

from grounding import guideline


def test_the_default_guideline_is_shipped_and_versioned():
    g = guideline.load()
    assert (g.name, g.version, g.id) == ("groundlabel-default", "1", "groundlabel-default@1")
    for rule in ("## Occlusion", "## Several matching objects", "## No such object",
                 "[600, 450, 640, 480]", "[600, 450, 40, 30]", "x = 93.75"):
        assert rule in g.body, rule
    assert not g.body.startswith("---")


def test_the_default_guideline_is_package_data():
    import tomllib
    from pathlib import Path

    conf = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "guidelines/*.md" in conf["tool"]["setuptools"]["package-data"]["grounding"]


def test_html_names_the_version_and_reads_back():
    g = guideline.load()
    html = g.html()
    assert "<table>" in html and "<h2>Occlusion</h2>" in html
    assert guideline.from_instructions(html) == g.id
    assert guideline.from_instructions("<p>some other project's rules</p>") is None
    assert guideline.from_instructions(None) is None


def test_raw_html_in_a_guideline_is_escaped(tmp_path):
    p = tmp_path / "g.md"
    p.write_text('---\nname: team\nversion: 2\n---\n# Rules\n<script>alert(1)</script>\n')
    g = guideline.load(p)
    assert g.id == "team@2"  # a YAML number is a version too
    assert "<script>" not in g.html()


@pytest.mark.parametrize("text, says", [
    ("# Rules\n", "front matter"),                          # no front matter
    ("---\nname: team\n---\n# Rules\n", "no `version:`"),   # no version
    ("---\nversion: 1\n---\n# Rules\n", "needs `name:`"),    # no name
    ("---\nname: a team\nversion: 1\n---\n# R\n", "needs `name:`"),  # spaces in the name
    ("---\nname: team\nversion: 1@2\n---\n# R\n", "without '@'"),     # '@' in the version
    ("---\nname: team\nversion: 1\n---\n\n", "no text"),    # nothing after the front matter
    ("---\n[1, 2\n---\n# R\n", "not YAML"),
])
def test_bad_guidelines_are_refused_with_a_clear_error(tmp_path, text, says):
    p = tmp_path / "g.md"
    p.write_text(text)
    with pytest.raises(guideline.GuidelineError, match=says.replace("(", r"\(")):
        guideline.load(p)


def test_a_missing_guideline_file_is_a_clear_error(tmp_path):
    with pytest.raises(guideline.GuidelineError, match="cannot read the guideline"):
        guideline.load(tmp_path / "nope.md")
