"""The documentation's commands, the README's shape and the site's navigation (no torch, well under 5 s).

- Every `lightning-idlg ...` command in a fenced bash block of README.md and docs/**/*.md composes with Hydra
  on configs/ (a multirun's sweep `a,b` at its first value; every value of a swept group must be one of its
  options), `lightning-idlg-train` with configs/train.yaml,
  `lightning-idlg-labels` with configs/label_restoration.yaml; `lightning-idlg-report` and the benchmark
  scripts are given only options their argument parsers define, and the Hydra overrides they pass on
  (`--override`, `--dlg-override`, labels_breaching's positionals) compose too. Composing reads no data, so
  `/path/to/mnist` is fine.
- README.md is at most 15,000 bytes and its first two bash commands are the install and the test command.
- Every page in mkdocs.yml's nav exists, and every .md file under docs/ (but those mkdocs.yml excludes) is in
  the nav or linked from a page in it.

Without torch (tests/conftest.py imports it): python -m pytest --noconftest tests/apps/test_docs.py
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
INSTALL = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 "
           "&& pip install -e . && lightning-idlg")
TESTS = "pip install -e '.[test]' && python -m pytest -q -n 2 --durations=15"
# the command lines that take Hydra overrides, and the config each composes
HYDRA_APPS = {"lightning-idlg": "config", "lightning-idlg-train": "train", "lightning-idlg-labels": "label_restoration"}
# what a documented command needs beyond hydra-core (the `test` extra installs all three)
PLUGINS = {"hparams_search=optuna_lbfgs": "hydra_plugins.hydra_optuna_sweeper",
           "hydra/launcher=local": "hydra_plugins.hydra_joblib_launcher",
           "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
           "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher"}
# the extending guide's own config folder: the tests' copy of it holds the same defense=sign, attack=bias_idlg
PLACEHOLDER_SEARCHPATH = "file:///path/to/my_configs"
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced bash / sh / shell block, in order (indented ones too)."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[:3]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if lang in ("bash", "sh", "shell"):
            blocks.append((i + 2, "\n".join(body)))
        i = j + 1
    return blocks


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet: comments, line continuations and env assignments dropped,
    split at && || ; | &."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in SHELL_OPERATORS:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    result = []
    for cmd in out:
        while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):  # CUDA_VISIBLE_DEVICES=0 ...
            cmd = cmd[1:]
        if cmd:
            result.append(cmd)
    return result


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        for line, text in bash_blocks(path):
            for cmd in commands(text):
                found.append((f"{path.relative_to(ROOT)}:{line}", cmd))
    return found


ALL = documented_commands()


def is_hydra_app(cmd: list[str]) -> bool:
    return cmd[0] in HYDRA_APPS or cmd[:3] == ["python", "-m", "lightning_idlg"]


HYDRA_COMMANDS = [(where, cmd) for where, cmd in ALL if is_hydra_app(cmd)]
SCRIPT_COMMANDS = [(where, cmd) for where, cmd in ALL
                   if cmd[0] == "lightning-idlg-report" or (cmd[0] == "python" and len(cmd) > 1
                                                           and cmd[1].startswith("benchmarks/"))]


def variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each sweep (`a,b`: a multirun's jobs), the others at their first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
              for o in parsed]
    keys = [o.get_key_element() for o in parsed]
    first = [f"{k}={v[0]}" if o.value_type is not None else k for k, v, o in zip(keys, values, parsed)]
    out = [first]
    for i, vs in enumerate(values):
        for v in vs[1:]:
            out.append(first[:i] + [f"{keys[i]}={v}"] + first[i + 1:])
    return out


COMPOSED: set[tuple[str, tuple[str, ...]]] = set()  # (config, overrides) composed already: pages repeat commands


@pytest.fixture(scope="module")
def hydra_configs():
    """configs/ initialized once for the module; Hydra re-reads every YAML file on each compose (100 ms
    here), so the files it reads are kept (a deep copy each time: every compose gets fresh objects)."""
    from hydra._internal.config_repository import ConfigRepository

    load, cache = ConfigRepository.load_config, {}

    def cached(self, config_path):
        key = (tuple((s.provider, s.path) for s in self.sources), config_path)
        if key not in cache:
            cache[key] = load(self, config_path)
        return copy.deepcopy(cache[key])

    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConfigRepository, "load_config", cached)
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            yield
    GlobalHydra.instance().clear()


def compose_all(config_name: str, overrides: list[str]) -> int:
    """Compose `overrides` with configs/<config_name>.yaml (inside `hydra_configs`), a multirun's sweeps at
    their first value; each further value of a swept config group must be an option of that group (a further
    value of a plain key changes no key, so it composes as the first did). Returns how many jobs that is."""
    ours = f"hydra.searchpath=[file://{ROOT / 'tests' / 'configs'}]"
    overrides = [ours if o == f"hydra.searchpath=[{PLACEHOLDER_SEARCHPATH}]" else o for o in overrides]
    runs = variants(overrides)
    if (config_name, tuple(runs[0])) not in COMPOSED:
        cfg = compose(config_name, overrides=runs[0], return_hydra_config=True)
        assert cfg.get("hydra") is not None
        COMPOSED.add((config_name, tuple(runs[0])))
    loader = GlobalHydra.instance().config_loader()
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override() and ((CONFIGS / o.key_or_group).is_dir() or o.key_or_group.startswith("hydra/")):
            options = loader.get_group_options(o.key_or_group)
            for value in o.sweep_string_iterator():
                assert value in options, f"{o.key_or_group}={value}: not an option of {o.key_or_group} ({options})"
    return len(runs)


def hydra_arguments(cmd: list[str]) -> tuple[str, list[str]]:
    app = "lightning-idlg" if cmd[0] == "python" else cmd[0]
    args = cmd[3:] if cmd[0] == "python" else cmd[1:]
    args = [a for a in args if a not in ("-m", "--multirun")]
    if app == "lightning-idlg":  # as the app's main() passes them to Hydra (labels=NAME)
        from lightning_idlg.app import expand_shortcuts
        args = expand_shortcuts(args)
    return HYDRA_APPS[app], args


def needs_plugin(overrides: list[str]) -> None:
    for o in overrides:
        module = PLUGINS.get(o)
        if module and importlib.util.find_spec(module) is None:
            pytest.skip(f"{o} needs {module} (pip install -e '.[test]')")


def test_the_docs_have_commands_of_every_kind():
    """The collection below is not empty by accident (a fence or lexer change would silence the tests)."""
    apps = {hydra_arguments(cmd)[0] for _, cmd in HYDRA_COMMANDS}
    assert apps == {"config", "train", "label_restoration"}
    assert len(HYDRA_COMMANDS) >= 60, len(HYDRA_COMMANDS)
    assert sum(cmd[0] == "lightning-idlg-report" for _, cmd in SCRIPT_COMMANDS) >= 5
    assert commands("a=1 lightning-idlg x=1 \\\n  y=2 # z=3\nb && lightning-idlg-labels -m c=4,5 &") == [
        ["lightning-idlg", "x=1", "y=2"], ["b"], ["lightning-idlg-labels", "-m", "c=4,5"]]
    assert variants(["a=1,2", "b=3", "~c"]) == [["a=1", "b=3", "~c"], ["a=2", "b=3", "~c"]]


@pytest.mark.parametrize("where,cmd", HYDRA_COMMANDS, ids=[w for w, _ in HYDRA_COMMANDS])
def test_every_documented_command_composes(where, cmd, hydra_configs):
    config_name, overrides = hydra_arguments(cmd)
    needs_plugin(overrides)
    assert compose_all(config_name, overrides) >= 1


def test_a_bad_override_does_not_compose(hydra_configs):
    """The check above can fail: a key that is not in the config, and an option that is not in its group."""
    for bad in (["trials_per_batch=4"], ["defense=nosuch"], ["method=dlg", "attack.idlg.stopping.steps=3"]):
        with pytest.raises(Exception):
            compose_all("config", bad)


def options_of(source: str) -> dict[str, bool]:
    """--option -> whether it takes a value, from the argparse calls in `source`."""
    out = {}
    for call in source.split("add_argument(")[1:]:
        match = re.match(r'\s*"(--[\w-]+)"', call)
        if match:
            out[match.group(1)] = "store_true" not in call and "store_false" not in call
    return out


def script_source(cmd: list[str]) -> str:
    if cmd[0] == "lightning-idlg-report":
        files = [ROOT / "lightning_idlg" / "report.py", *sorted((ROOT / "lightning_idlg" / "report").glob("*.py"))]
    else:
        files = [ROOT / cmd[1]]
    files = [f for f in files if f.exists()]
    assert files, f"{cmd[0]} {cmd[1]}: no source"
    return "\n".join(f.read_text() for f in files)


OVERRIDE_OPTIONS = {"--override", "--dlg-override"}


@pytest.mark.parametrize("where,cmd", SCRIPT_COMMANDS, ids=[w for w, _ in SCRIPT_COMMANDS])
def test_every_documented_report_and_benchmark_command_uses_options_that_exist(where, cmd, hydra_configs):
    args = cmd[1:] if cmd[0] == "lightning-idlg-report" else cmd[2:]
    options = options_of(script_source(cmd))
    given, positional, i = {}, [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, _, inline = arg.partition("=")
            assert name in options, f"{where}: {cmd[0]} has no option {name}; it has {', '.join(sorted(options))}"
            if options[name] and not inline:
                assert i + 1 < len(args), f"{where}: {name} needs a value"
            value = inline or (args[i + 1] if options[name] else None)
            given.setdefault(name, []).append(value)
            i += 1 if inline or not options[name] else 2
        else:
            positional.append(arg)
            i += 1
    # a page written into docs/ by this command names a preface, folder and page that are there
    for option in ("--preface", "--write-doc"):
        for value in given.get(option, []):
            if value.startswith("docs/"):
                assert (ROOT / value).is_file(), f"{where}: {option} {value} does not exist"
    for out in given.get("--out", []):
        if out.startswith("docs"):
            name = (given.get("--report-name") or ["report.md"])[0]
            assert (ROOT / out / name).is_file(), f"{where}: --out {out} --report-name {name}: no such page"
    # the Hydra overrides the script hands to the app compose as the app's own
    script = Path(cmd[1]).name if cmd[0] == "python" else None
    if script == "paper_protocol.py":
        preset = (given.get("--preset") or ["paper_cifar100"])[0]
        compose_all("config", [f"experiment={preset}", "method=idlg", *given.get("--override", [])])
    elif script == "peer_breaching.py" and "--dlg-override" in given:
        compose_all("config", ["experiment=paper_cifar100", "method=idlg", *given["--dlg-override"]])
    elif script == "labels_breaching.py":
        compose_all("label_restoration", positional)


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.encode()) <= 15_000, len(text.encode())
    blocks = bash_blocks(README)
    assert [body.strip() for _, body in blocks[:2]] == [INSTALL, TESTS]
    # the measured suite time stays beside the test command
    after = text[text.index(TESTS):]
    assert re.search(r"the \d+ tests took \d+ min \d+ s", after[:600]), "the suite's measured time, beside its command"


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def site():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    excluded = [p.strip() for p in (config.get("exclude_docs") or "").splitlines() if p.strip()]
    pages = nav_pages(config["nav"])
    return config, pages, excluded


LINK = re.compile(r"\]\(([^)\s#]+\.md)(#[^)\s]*)?\)")


def test_every_nav_page_exists_and_every_page_is_reachable():
    config, pages, excluded = site()
    assert config["site_name"] == "lightning_idlg" and config["docs_dir"] == "docs"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav names missing pages: {missing}"
    assert len(pages) == len(set(pages)) >= 20, len(pages)
    linked = set()
    for page in pages:
        for target, _ in LINK.findall((DOCS / page).read_text()):
            if "://" in target:
                continue
            path = (DOCS / page).parent / target
            assert path.is_file(), f"{page} links to {target}, which does not exist"
            linked.add(path.resolve().relative_to(DOCS.resolve()).as_posix())
    for md in sorted(DOCS.rglob("*.md")):
        name = md.relative_to(DOCS).as_posix()
        if any(fnmatch.fnmatch(name, pattern.lstrip("/")) for pattern in excluded):
            continue
        assert name in pages or name in linked, f"docs/{name} is neither in mkdocs.yml's nav nor linked from a page in it"


def test_the_reference_has_a_page_per_stage_folder():
    _, pages, _ = site()
    reference = {p for p in pages if p.startswith("reference/")}
    blocks = {p: re.findall(r"^::: (\S+)", (DOCS / p).read_text(), re.M) for p in reference}
    assert set(blocks["reference/case.md"]) >= {"lightning_idlg.case.dataset", "lightning_idlg.case.plan"}
    assert all(m.startswith("lightning_idlg.attacks.") for m in blocks["reference/attacks.md"])
    # every module of the package has its block, once
    package = DOCS.parent / "lightning_idlg"
    modules = sorted(".".join(("lightning_idlg", *f.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
                     for f in package.rglob("*.py") if f.name != "__main__.py" and "configs" not in f.parts
                     and not (f.name == "__init__.py" and "import" not in f.read_text()))  # a docstring only
    named = sorted(m for b in blocks.values() for m in b)
    assert named == modules, set(modules) ^ set(named)
