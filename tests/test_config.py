"""The config system: strict loading, dotted overrides, includes, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.core import config
from pipeline.core.config import ConfigError
from pipeline.core.registry import Registry


@dataclasses.dataclass(kw_only=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.98)
    name: str = "adamw"

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclasses.dataclass(kw_only=True)
class Run:
    out: str  # required
    steps: int = 10
    resume: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    dtype: str = "fp32"


@dataclasses.dataclass(kw_only=True)
class Root:
    run: Run
    optim: Optim = dataclasses.field(default_factory=Optim)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_loads_yaml_with_overrides_and_types(tmp_path):
    path = write(tmp_path, "a.yaml", "run: {out: /tmp/x, steps: 5}\noptim: {lr: 0.1}\n")
    cfg = config.load(Root, path, ["optim.lr=3e-4", "run.tags=[a, b]", "optim.betas=[0.9, 0.95]", "run.resume=latest"])
    assert cfg.run.steps == 5 and cfg.optim.lr == 3e-4 and cfg.run.tags == ["a", "b"]
    assert cfg.optim.betas == (0.9, 0.95) and cfg.run.resume == "latest"
    assert isinstance(config.load(Root, path, ["optim.lr=1"]).optim.lr, float)  # int widens to float


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "a.yaml", "run: {out: o, stpes: 5}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'run.stpes' in .*a\.yaml.*did you mean 'run.steps'"):
        config.load(Root, path)
    good = write(tmp_path, "b.yaml", "run: {out: o}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' in the command line.*'optim.lr'"):
        config.load(Root, good, ["optim.lrr=0.1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.steps=ten", r"wrong type for 'run.steps' in the command line: expected int, got 'ten'"),
        ("run.steps=1.5", r"expected int"),
        ("optim.lr=[1]", r"wrong type for 'optim.lr'"),
        ("run.tags=3", r"expected a list"),
        ("run.steps=true", r"expected int"),
    ],
)
def test_wrong_type_is_refused(tmp_path, override, message):
    path = write(tmp_path, "a.yaml", "run: {out: o}\n")
    with pytest.raises(ConfigError, match=message):
        config.load(Root, path, [override])


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "run: {out: o, steps: '5'}\n")
    with pytest.raises(ConfigError, match=r"'run.steps' in .*bad\.yaml"):
        config.load(Root, path)


def test_missing_required_value(tmp_path):
    path = write(tmp_path, "a.yaml", "optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"missing required value 'run'"):
        config.load(Root, path)
    path = write(tmp_path, "b.yaml", "run: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"missing required value 'run.out'.*b\.yaml"):
        config.load(Root, path)
    assert config.load(Root, path, ["run.out=here"]).run.out == "here"


def test_validate_hook_reports_section_and_file(tmp_path):
    path = write(tmp_path, "a.yaml", "run: {out: o}\noptim: {lr: -1.0}\n")
    with pytest.raises(ConfigError, match=r"optim.*a\.yaml.*lr must be positive"):
        config.load(Root, path)


def test_base_file_and_section_include(tmp_path):
    write(tmp_path, "optim/fast.yaml", "lr: 0.5\nname: sgd\n")
    write(tmp_path, "base.yaml", "run: {out: o, steps: 7}\noptim: optim/fast.yaml\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nrun: {steps: 9}\n")
    cfg = config.load(Root, child)
    assert (cfg.run.out, cfg.run.steps, cfg.optim.lr, cfg.optim.name) == ("o", 9, 0.5, "sgd")
    # a dotted override lands inside an included section; the include itself can be swapped
    assert config.load(Root, child, ["optim.lr=0.25"]).optim == Optim(lr=0.25, name="sgd")
    write(tmp_path, "optim/slow.yaml", "lr: 0.01\n")
    assert config.load(Root, child, [f"optim={tmp_path / 'optim/slow.yaml'}"]).optim.lr == 0.01
    write(tmp_path, "optim/typo.yaml", "lrate: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate' in .*typo\.yaml"):
        config.load(Root, child, [f"optim={tmp_path / 'optim/typo.yaml'}"])


def test_dotted_key_in_a_file_sets_one_key_of_an_included_section(tmp_path):
    write(tmp_path, "optim/fast.yaml", "lr: 0.5\nname: sgd\n")
    path = write(tmp_path, "run.yaml", "run: {out: o}\noptim: optim/fast.yaml\noptim.lr: 0.125\n")
    assert config.load(Root, path).optim == Optim(lr=0.125, name="sgd")
    assert config.load(Root, path, ["optim.lr=0.25"]).optim.lr == 0.25  # the command line still wins
    write(tmp_path, "bad.yaml", "run: {out: o}\noptim: optim/fast.yaml\noptim.lrate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate'"):
        config.load(Root, tmp_path / "bad.yaml")


ENTRIES: Registry = Registry("model")


@ENTRIES.register("small")
class Small:
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "small"
        width: int = 8


@dataclasses.dataclass(kw_only=True)
class ModelSection(config.Section):
    registry = ENTRIES


@dataclasses.dataclass(kw_only=True)
class Top:
    model: ModelSection


def test_registry_dispatched_section(tmp_path):
    cfg = config.load(Top, write(tmp_path, "m.yaml", "model: {name: small, width: 16}\n"))
    assert cfg.model == Small.Config(name="small", width=16)
    with pytest.raises(ConfigError, match=r"unknown key 'model.depth'"):
        config.load(Top, write(tmp_path, "m2.yaml", "model: {name: small, depth: 2}\n"))
    with pytest.raises(ConfigError, match=r"unknown model 'smal'.*did you mean 'small'"):
        config.load(Top, write(tmp_path, "m3.yaml", "model: {name: smal}\n"))
    with pytest.raises(ConfigError, match=r"'model'.*needs a 'name', one of: small"):
        config.load(Top, write(tmp_path, "m4.yaml", "model: {width: 2}\n"))


@dataclasses.dataclass(kw_only=True)
class Settings:
    steps: list[str] = dataclasses.field(default_factory=list)


def test_one_section_per_registered_entry(tmp_path):
    schema = config.with_sections("WithSections", Settings, ENTRIES)
    cfg = config.load(schema, write(tmp_path, "s.yaml", "steps: [small]\nsmall: {width: 3}\n"))
    assert cfg.small == Small.Config(name="small", width=3) and cfg.steps == ["small"]
    assert config.load(schema).small == Small.Config(name="small")  # every section has its defaults
    with pytest.raises(ConfigError, match=r"unknown key 'small.depth'"):
        config.load(schema, None, ["small.depth=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(Root, write(tmp_path, "a.yaml", "run: {out: o, tags: [x]}\n"), ["optim.lr=0.2"])
    config.save(cfg, tmp_path / "out" / "config.yaml")
    assert config.load(Root, tmp_path / "out" / "config.yaml") == cfg
    assert config.from_dict(Root, config.to_dict(cfg)) == cfg


def test_bad_override_syntax_and_yaml(tmp_path):
    path = write(tmp_path, "a.yaml", "run: {out: o}\n")
    with pytest.raises(ConfigError, match="not of the form"):
        config.load(Root, path, ["run.steps"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(Root, write(tmp_path, "broken.yaml", "run: {out: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        config.load(Root, tmp_path / "nope.yaml")


def test_registry_errors():
    reg: Registry = Registry("objective")
    reg.register("clip", object)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("clip", object)
    with pytest.raises(KeyError, match=r"unknown objective 'clp'.*'clip'"):
        reg.get("clp")
    assert reg.names() == ["clip"] and "clip" in reg


CONFIGS = sorted(Path(config.CONFIG_ROOT).rglob("*.yaml"))


def test_every_shipped_config_is_valid_yaml():
    """Each stage's own tests load its configs into its schema; here: all parse as mappings."""
    import yaml

    for path in CONFIGS:
        assert isinstance(yaml.safe_load(path.read_text()) or {}, dict), path


