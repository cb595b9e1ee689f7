"""The documentation site (issue 28): every public name is in the API reference and documented, the README stays a
front page, and every guide is reachable from it. ``mkdocs build --strict`` in the test command checks the links and
the docstrings' sections; these check what it cannot see: a name or a docstring that is missing altogether."""

import inspect
import re

import pytest

import lightning_lowrank
from lightning_lowrank import curvature
from tests import ROOT

API_PAGE = ROOT / "docs" / "reference" / "api.md"


def _documented_objects() -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)$", API_PAGE.read_text(), flags=re.MULTILINE))


@pytest.mark.parametrize("name", lightning_lowrank.__all__)
def test_every_export_is_in_the_api_reference(name):
    documented = {path.rsplit(".", 1)[-1] for path in _documented_objects()}
    assert name in documented, f"lightning_lowrank.{name} is exported but docs/reference/api.md has no '::: ' for it"


def test_the_api_reference_names_real_objects():
    """Each ``::: module.name`` resolves to the object ``lightning_lowrank`` exports under that name."""
    for path in sorted(_documented_objects()):
        module, _, name = path.rpartition(".")
        obj = getattr(__import__(module, fromlist=[name]), name)
        if hasattr(lightning_lowrank, name) and name in lightning_lowrank.__all__:
            assert obj is getattr(lightning_lowrank, name), path


def _public_members(cls: type) -> list[tuple[str, object]]:
    """Methods and properties a class defines itself (inherited ones are documented where they are defined)."""
    members = []
    for key, value in vars(cls).items():
        if key.startswith("_"):
            continue
        if isinstance(value, property):
            inherited = next((vars(b)[key] for b in cls.__mro__[1:] if key in vars(b)), None)
            members.append((key, value.__doc__ or getattr(inherited, "__doc__", None)))
        elif callable(value) or isinstance(value, (classmethod, staticmethod)):
            members.append((key, inspect.getdoc(getattr(cls, key))))  # an override inherits its base's docstring
    return members


@pytest.mark.parametrize("name", lightning_lowrank.__all__)
def test_every_export_and_its_public_members_have_a_docstring(name):
    obj = getattr(lightning_lowrank, name)
    assert inspect.getdoc(obj), f"lightning_lowrank.{name} has no docstring"
    if inspect.isclass(obj):
        missing = [key for key, doc in _public_members(obj) if not doc]
        assert not missing, f"{name}: public members without a docstring: {missing}"


@pytest.mark.parametrize("name", curvature.__all__)
def test_the_curvature_estimators_have_docstrings(name):
    assert inspect.getdoc(getattr(curvature, name)), f"lightning_lowrank.curvature.{name} has no docstring"


def test_the_readme_is_a_front_page_that_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 230, "the README is the front page: the manual lives in docs/"
    guides = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "guides").glob("*.md"))
    assert guides, "docs/guides/ is empty"
    unlinked = [g for g in guides if f"({g})" not in readme]
    assert not unlinked, f"guides the README does not link: {unlinked}"


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []
