"""The README's configuration reference is generated from the schemas and kept up to date."""

import dataclasses

from pipeline import config_doc


def test_readme_reference_is_up_to_date():
    readme = config_doc.README.read_text()
    assert config_doc.readme_block(readme) == config_doc.reference().strip("\n"), (
        "README.md's configuration reference is stale: run `python -m pipeline.config_doc --write`"
    )


def test_every_key_with_its_comment_type_and_default():
    @dataclasses.dataclass(kw_only=True)
    class Inner:
        depth: int = 3  # how deep

    @dataclasses.dataclass(kw_only=True)
    class Outer:
        name: str  # required, with a comment
        inner: Inner = dataclasses.field(default_factory=Inner)
        tags: list[str] = dataclasses.field(default_factory=list)

    assert config_doc.rows(Outer) == [
        ("name", "str", "**required**", "required, with a comment"),
        ("inner", "Inner", "(section)", ""),
        ("inner.depth", "int", "`3`", "how deep"),
        ("tags", "list[str]", "`[]`", ""),
    ]
