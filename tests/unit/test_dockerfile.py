"""The Dockerfile, checked without a Docker engine: what it copies reaches the build context, what it
runs is a declared console script, the base image's Python satisfies the project, the PostgreSQL
clients are one per server major of the documented support matrix (the newest on PATH), and the
runtime stage runs as the agent's non-root uid with no build tools. Also: extra CA certificates are
a build input only, a PostgreSQL client that cannot be installed fails the build naming its major
(the check itself is run here against a stand-in ``apt-cache``), the dependencies are installed in a
layer before the code is copied, and nothing needs BuildKit (dockerd's legacy builder builds it).

The Dockerfile is parsed as Docker does it: parser directives, line continuations (comment lines
inside a continuation dropped), stages by ``FROM ... AS name``, ``ARG`` defaults (global ones only in
``FROM`` lines and in stages that declare them again) and ``${VAR}`` substitution.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UPGRADING = ROOT / "docs" / "upgrading.md"
#: The build input for extra CA certificates (certs/README.md) and where the stages copy it.
CERTS_DIR = "certs/"
EXTRA_CA_DEST = "/tmp/extra-ca/"

KEYWORDS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}
#: Packages that compile or build; none may be installed in the image that ships.
BUILD_TOOLS = re.compile(r"^(gcc|g\+\+|cpp|clang|cc|make|cmake|build-essential|binutils|libc6-dev|.*-dev)$")


# --- Dockerfile parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    index: int
    name: str
    image: str
    #: ARG and ENV values in effect, in order of declaration.
    variables: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def split_instructions(text: str) -> list[Instruction]:
    """Logical instructions: continuations joined, comments and empty continuation lines dropped."""
    lines = text.splitlines()
    escape = "\\"
    start = 0
    # Parser directives: leading `# key=value` comments, before anything else.
    for i, raw in enumerate(lines):
        m = re.match(r"^#\s*(\w+)\s*=\s*(\S+)\s*$", raw)
        if not m:
            start = i
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    out: list[Instruction] = []
    buf: list[str] = []
    first = 0
    for n, raw in enumerate(lines[start:], start=start + 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buf):
            continue  # a comment, also inside a continuation; an empty continuation line
        if not stripped:
            continue
        if not buf:
            first = n
        if stripped.endswith(escape):
            buf.append(stripped[: -len(escape)])
            continue
        buf.append(stripped)
        joined = " ".join(part.strip() for part in buf)
        keyword, _, args = joined.partition(" ")
        assert keyword.upper() in KEYWORDS, f"Dockerfile line {first}: unknown instruction {keyword!r}"
        assert "<<" not in args or keyword.upper() != "RUN", "heredocs are not parsed by this test"
        out.append(Instruction(keyword.upper(), args.strip(), first))
        buf = []
    assert not buf, "the Dockerfile ends inside a line continuation"
    return out


_VAR = re.compile(r"\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's ${VAR}, ${VAR:-default}, ${VAR:+alt} and $VAR; unknown variables stay as written
    (they come from the base image, like PATH)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        if name not in variables:
            return m.group(0) if m.group(2) != "-" else m.group(3)
        value = variables[name]
        if m.group(2) == "-":
            return value or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if value else ""
        return value

    return _VAR.sub(one, value)


def key_values(args: str) -> dict[str, str]:
    """ENV/LABEL/ARG arguments: `k=v k2="v 2"`, or the legacy `ENV key value`."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in split_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(index=len(stages), name=name, image=image))
            continue
        if not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
            continue
        stage = stages[-1]
        if ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            name = name.strip()
            if eq:
                stage.variables[name] = substitute(default.strip().strip('"'), stage.variables)
            elif name in global_args:
                stage.variables[name] = global_args[name]
        elif ins.keyword == "ENV":
            for k, v in key_values(ins.args).items():
                stage.variables[k] = substitute(v, stage.variables)
        stage.instructions.append(ins)
    assert stages, "the Dockerfile has no FROM"
    return Dockerfile(global_args, stages)


@cache
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


def exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list), f"line {ins.line}: {ins.keyword} must be a JSON list (exec form)"
    assert all(isinstance(v, str) for v in value)
    return [str(v) for v in value]


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None
    line: int


def copies(stage: Stage) -> list[Copy]:
    out = []
    for ins in stage.of("COPY") + stage.of("ADD"):
        m = re.fullmatch(r"((?:--\S+\s+)*)(.*)", ins.args, re.S)
        assert m
        flags = {f[2:].partition("=")[0]: f.partition("=")[2] for f in m.group(1).split()}
        rest = m.group(2).strip()
        # The JSON form, COPY ["src", "dest"], allows spaces in paths.
        paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        paths = [substitute(p, stage.variables) for p in paths]
        out.append(Copy(sources=paths[:-1], dest=paths[-1], from_stage=flags.get("from"), line=ins.line))
    return out


def run_text(stage: Stage) -> str:
    return "\n".join(substitute(i.args, stage.variables) for i in stage.of("RUN"))


#: The one shell loop the test expands: `for m in <words>; do pkgs="$pkgs <name-$m>"; done`, a
#: package list built from a list of majors (the Dockerfile's PG_MAJORS).
_PACKAGE_LOOP = re.compile(r'for (\w+) in ([^;]*); do (\w+)="\$\3 ([^"$]*)\$\1"; done')


def package_lists(text: str) -> dict[str, list[str]]:
    """The package lists a RUN builds in a shell variable with :data:`_PACKAGE_LOOP`, by name."""
    lists: dict[str, list[str]] = {}
    for m in _PACKAGE_LOOP.finditer(text):
        _var, words, target, prefix = m.groups()
        lists.setdefault(target, []).extend(prefix + w for w in words.split())
    return lists


def apt_installed(stage: Stage) -> list[str]:
    """Every package an `apt-get install` in the stage names (flags left out; a `$pkgs` built by a
    loop of :data:`_PACKAGE_LOOP` stands for its packages)."""
    packages: list[str] = []
    for ins in stage.of("RUN"):
        text = substitute(ins.args, stage.variables)
        lists = package_lists(text)
        for command in re.split(r"&&|;|\|\|", text):
            try:
                words = shlex.split(command)
            except ValueError:  # a quoted string that held a separator: not an install
                continue
            if len(words) >= 2 and words[0] in ("apt-get", "apt") and words[1] == "install":
                for w in words[2:]:
                    if w.startswith("-"):
                        continue
                    m = re.fullmatch(r"\$\{?(\w+)\}?", w)
                    if m:
                        assert m.group(1) in lists, (
                            f"line {ins.line}: apt-get install {w} is not a known list"
                        )
                        packages += lists[m.group(1)]
                    else:
                        packages.append(w.split("=")[0])
    return packages


# --- .dockerignore ---------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's patternmatcher: `**` any number of path elements, `*` and `?` within one."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(f"^{out}$")


@dataclass(frozen=True)
class IgnoreRules:
    rules: tuple[tuple[bool, re.Pattern[str]], ...]

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:].strip() if negated else line
            pattern = re.sub(r"/+", "/", pattern).strip("/") or "."
            rules.append((negated, _pattern_regex(pattern)))
        return cls(tuple(rules))

    def excluded(self, path: str) -> bool:
        """Whether ``path`` (relative to the context) is left out: the last rule matching the path
        or one of its parent directories decides."""
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negated, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negated
        return result


@cache
def ignore_rules() -> IgnoreRules:
    return IgnoreRules.parse(DOCKERIGNORE.read_text())


def files_under(rel: str) -> list[str]:
    """The files git tracks under ``rel`` (the sources of the image); all files when git is not
    available, less bytecode caches."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", rel], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        tracked = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    if tracked:
        return tracked
    base = ROOT / rel
    found = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
    return [p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts]


# --- project facts ---------------------------------------------------------------------------------


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def agent_uid() -> int:
    from nightjar.config import OperatorConfig

    default = {f.name: f.default for f in dataclasses.fields(OperatorConfig)}["agent_run_as_user"]
    assert isinstance(default, int)
    return default


def documented_pg_matrix() -> tuple[str, dict[int, list[str]]]:
    """The table under the "PostgreSQL versions" heading of docs/upgrading.md: its header line and
    its rows keyed by server major (rows like "18 and later" are not a supported major)."""
    text = UPGRADING.read_text()
    m = re.search(r"^##+ PostgreSQL versions\s*$(.*?)(?=^##+ |\Z)", text, re.M | re.S)
    assert m, "docs/upgrading.md has no 'PostgreSQL versions' section"
    rows = [ln.strip() for ln in m.group(1).splitlines() if ln.strip().startswith("|")]
    assert len(rows) >= 3, "the PostgreSQL versions section has no table"
    matrix: dict[int, list[str]] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if re.fullmatch(r"\d+", cells[0]):
            matrix[int(cells[0])] = cells[1:]
    return rows[0], matrix


# --- the checks ------------------------------------------------------------------------------------


def test_the_parser_joins_continuations_and_finds_stages() -> None:
    df = parse(
        "# escape=\\\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS one\n"
        "RUN a \\\n"
        "  # a comment inside the continuation\n"
        "  && b\n"
        "FROM --platform=linux/amd64 ${BASE}\n"
        "ARG BASE\n"
        'ENV A=1 B="two words" C=${BASE}\n'
    )
    assert [s.name for s in df.stages] == ["one", "1"]
    assert [s.image for s in df.stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert df.stages[0].of("RUN")[0].args == "a && b"
    assert df.stages[1].variables == {
        "BASE": "python:3.11-slim",
        "A": "1",
        "B": "two words",
        "C": "python:3.11-slim",
    }


def test_the_ignore_matcher_follows_docker_semantics() -> None:
    rules = IgnoreRules.parse("**\n!operator/\n**/__pycache__\n")
    assert rules.excluded(".local/kubeconfig")
    assert not rules.excluded("operator/nightjar/cli.py")
    assert rules.excluded("operator/nightjar/__pycache__/cli.cpython-311.pyc")
    rules = IgnoreRules.parse("docs\n!docs/keep.md\n*.tmp\n")
    assert rules.excluded("docs/a.md")
    assert not rules.excluded("docs/keep.md")
    assert rules.excluded("x.tmp")
    assert not rules.excluded("sub/x.tmp")


def test_every_copy_source_exists_and_reaches_the_build_context() -> None:
    checked = 0
    for stage in dockerfile().stages:
        for cp in copies(stage):
            if cp.from_stage is not None:
                continue
            for src in cp.sources:
                assert (ROOT / src).exists(), f"Dockerfile line {cp.line}: COPY source {src} does not exist"
                assert not ignore_rules().excluded(src), f".dockerignore leaves out {src} (line {cp.line})"
                left_out = [f for f in files_under(src) if ignore_rules().excluded(f)]
                assert left_out == [], f".dockerignore leaves out files COPY {src} needs: {left_out[:5]}"
                checked += 1
    assert checked >= 3, "expected the builder to COPY pyproject.toml, README.md and operator/"


def test_pyproject_s_readme_is_copied_with_it() -> None:
    """setuptools needs the readme pyproject.toml names to build the wheel."""
    copied = {src for cp in copies(dockerfile().stage("builder")) for src in cp.sources}
    assert {"pyproject.toml", pyproject()["project"]["readme"], "operator"} <= copied


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    for path in (
        ".local/kubeconfig",
        ".local/env",
        ".local/test/pki/tokens.csv",
        ".venv/bin/python",
        ".git/config",
        "tests/unit/test_dockerfile.py",
        "operator/nightjar/__pycache__/cli.cpython-311.pyc",
        "operator/nightjar.egg-info/PKG-INFO",
    ):
        assert ignore_rules().excluded(path), f".dockerignore lets {path} into the build context"


def test_final_stage_copies_only_the_venv_from_the_builder() -> None:
    df = dockerfile()
    names = [s.name for s in df.stages]
    froms = [cp for cp in copies(df.final) if cp.from_stage is not None]
    assert froms, "the final stage copies nothing from the builder"
    for cp in froms:
        assert cp.from_stage in names[: df.final.index], f"line {cp.line}: --from names no earlier stage"
        assert (cp.from_stage, cp.sources, cp.dest) == ("builder", ["/opt/nightjar"], "/opt/nightjar")
    # From the build context, only the (optional) extra CA certificates, which a RUN deletes.
    sources = [(cp.sources, cp.dest) for cp in copies(df.final) if cp.from_stage is None]
    assert sources == [([CERTS_DIR], EXTRA_CA_DEST)], "the final stage copies sources"
    assert "python -m venv /opt/nightjar" in run_text(df.stage("builder"))


def test_entrypoint_is_a_declared_console_script_and_cmd_one_of_its_commands() -> None:
    from nightjar.cli import main

    final = dockerfile().final
    (entrypoint,) = final.of("ENTRYPOINT")[-1:]
    (cmd,) = final.of("CMD")[-1:]
    scripts = pyproject()["project"]["scripts"]
    assert exec_form(entrypoint) == ["nightjar"]
    assert scripts["nightjar"] == "nightjar.cli:main"
    assert exec_form(cmd) == ["operator"]
    # One image: the operator by default, the agent for the Jobs (their args start with "agent").
    assert {"operator", "agent"} <= set(main.commands)


def test_base_image_python_satisfies_requires_python_and_both_stages_share_it() -> None:
    df = dockerfile()
    assert len(df.stages) >= 2, "expected a builder and a runtime stage"
    versions = set()
    for stage in df.stages:
        m = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim-(\w+)(@sha256:[0-9a-f]{64})?", stage.image)
        assert m, f"stage {stage.name}: base {stage.image} is not a pinned python:X.Y-slim-<release>"
        versions.add(m.group(1))
    assert len({s.image for s in df.stages}) == 1, "the venv only runs on the interpreter it was built with"
    (version,) = versions
    requires = pyproject()["project"]["requires-python"]
    assert SpecifierSet(requires).contains(version), f"python {version} does not satisfy {requires}"


def test_no_image_is_unpinned_or_latest() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r":latest\b", text)
    for stage in dockerfile().stages:
        name = stage.image.split("@")[0]
        assert ":" in name.rsplit("/", 1)[-1], f"stage {stage.name}: {stage.image} has no tag"
    assert re.search(r"@sha256:", text), "the Dockerfile says how to pin the base image by digest"


def test_the_package_loop_is_expanded() -> None:
    text = (
        'set -eux; pkgs=""; for m in 12 13; do pkgs="$pkgs postgresql-client-$m"; done; '
        "apt-get install -y $pkgs"
    )
    stage = Stage(0, "t", "img", instructions=[Instruction("RUN", text, 1)])
    assert apt_installed(stage) == ["postgresql-client-12", "postgresql-client-13"]


def test_one_client_per_documented_server_major_and_the_newest_on_path() -> None:
    from nightjar.domain import pgclient

    df = dockerfile()
    majors = [int(m) for m in df.global_args["PG_MAJORS"].split()]
    pg_major = int(df.global_args["PG_MAJOR"])
    _header, matrix = documented_pg_matrix()
    assert matrix, "the support matrix lists no server majors"
    assert sorted(majors) == sorted(matrix), "PG_MAJORS and the documented server majors differ"
    assert pg_major == max(majors) == max(matrix)
    # Backups and restores of every documented major work, each with the client of its major.
    for major, cells in matrix.items():
        assert cells[0].lower().startswith("yes"), f"backups of PostgreSQL {major}"
        assert cells[1].lower().startswith("yes"), f"restores into PostgreSQL {major}"
        assert f"/usr/lib/postgresql/{major}/bin" in cells[2], f"the client row of {major}"
    final = df.final
    assert final.variables["PG_MAJORS"] == df.global_args["PG_MAJORS"]
    installed = apt_installed(final)
    for major in majors:
        assert f"postgresql-client-{major}" in installed
    # Each client lands in <root>/<major>/bin, where the agent looks for it; the image does not
    # pin one (NIGHTJAR_PG_BINDIR is an override for the agent's env, not the image's).
    assert "NIGHTJAR_PG_BINDIR" not in final.variables
    assert final.variables["NIGHTJAR_PG_ROOT"] == pgclient.DEFAULT_ROOT == "/usr/lib/postgresql"
    runs = run_text(final)
    assert '"/usr/lib/postgresql/$major/bin/$tool" --version' in runs
    assert re.search(r"for tool in psql pg_dump pg_restore;", runs), "the build checks each client"
    bindir = f"/usr/lib/postgresql/{pg_major}/bin"
    path = final.variables["PATH"].split(":")
    assert bindir in path
    assert "/usr/bin" not in path[: path.index(bindir)], "Debian's pg_wrapper in /usr/bin would win"
    agent_cli = (ROOT / "operator" / "nightjar" / "agent" / "cli.py").read_text()
    assert 'pg_bindir=_env("NIGHTJAR_PG_BINDIR")' in agent_cli, "the agent no longer reads NIGHTJAR_PG_BINDIR"
    assert 'pg_root=_env("NIGHTJAR_PG_ROOT")' in agent_cli, "the agent does not read NIGHTJAR_PG_ROOT"


def test_final_stage_runs_as_the_agent_uid_not_root() -> None:
    final = dockerfile().final
    user = final.of("USER")[-1].args
    m = re.fullmatch(r"(\d+):(\d+)", user)
    assert m, f"USER {user} must be a numeric uid:gid (runAsNonRoot cannot check a name)"
    uid, gid = int(m.group(1)), int(m.group(2))
    assert uid == gid == agent_uid() != 0
    runs = run_text(final)
    assert f"--uid {uid}" in runs
    assert f"--gid {gid}" in runs
    # Nothing after USER may switch back.
    assert final.instructions[-1].keyword in ("CMD", "ENTRYPOINT")
    last_user = max(i for i, ins in enumerate(final.instructions) if ins.keyword == "USER")
    assert not [ins for ins in final.instructions[last_user:] if ins.keyword == "RUN"]


def test_final_stage_has_no_build_tools_and_no_apt_lists() -> None:
    final = dockerfile().final
    installed = apt_installed(final)
    assert installed, "expected the final stage to install the PostgreSQL client"
    assert [p for p in installed if BUILD_TOOLS.match(p)] == []
    runs = run_text(final)
    assert "gcc" not in runs
    assert "build-essential" not in runs
    for ins in final.of("RUN"):
        if "apt-get update" in ins.args:
            assert "--no-install-recommends" in ins.args
            assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"line {ins.line}: apt lists stay in the layer"


def test_python_environment_and_oci_labels() -> None:
    final = dockerfile().final
    assert final.variables["PYTHONDONTWRITEBYTECODE"] == "1"
    assert final.variables["PYTHONUNBUFFERED"] == "1"
    labels: dict[str, str] = {}
    for ins in final.of("LABEL"):
        labels.update({k: substitute(v, final.variables) for k, v in key_values(ins.args).items()})
    project = pyproject()["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert re.fullmatch(r"https://\S+", labels["org.opencontainers.image.source"])


@pytest.mark.parametrize("variable", ["PG_MAJORS", "PG_MAJOR", "VERSION"])
def test_stage_args_take_the_global_defaults(variable: str) -> None:
    """A global ARG is only visible in a stage that declares it again; a stage that forgot to
    would install `postgresql-client-` or label version ``."""
    final = dockerfile().final
    assert final.variables.get(variable) == dockerfile().global_args[variable]


# --- build-time inputs: extra CA certificates, the PostgreSQL client check, layer order -----------


def test_nothing_needs_buildkit() -> None:
    """dockerd's legacy builder (DOCKER_BUILDKIT=0, Debian's docker.io 20.10 has no buildx) must be
    able to build it: no syntax directive, RUN --mount, COPY --chmod/--link or heredocs."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    for stage in dockerfile().stages:
        for ins in stage.instructions:
            m = re.match(r"((?:--[\w-]+(?:=\S*)?\s+)*)", ins.args)
            flags = set(re.findall(r"--([\w-]+)", m.group(1) if m else ""))
            allowed = {"COPY": {"from", "chown"}, "ADD": {"chown"}}.get(ins.keyword, set())
            assert flags <= allowed, (
                f"line {ins.line}: {ins.keyword} --{sorted(flags - allowed)} needs BuildKit"
            )
            assert "<<" not in ins.args, f"line {ins.line}: heredocs need BuildKit"


def _stage_uses_network(stage: Stage) -> bool:
    runs = run_text(stage)
    return "apt-get update" in runs or "pip install --no-compile -r" in runs


def test_extra_ca_certificates_are_an_optional_build_input() -> None:
    """certs/ reaches the context and holds no certificate in git (a plain build is unchanged);
    every stage that downloads copies it first."""
    assert (ROOT / CERTS_DIR).is_dir()
    assert not ignore_rules().excluded("certs/corp.pem")
    tracked = files_under(CERTS_DIR)
    assert tracked == ["certs/README.md"], f"certs/ must hold no certificate in git: {tracked}"
    if (ROOT / ".git").exists():
        for path in ("certs/corp.pem", "certs/corp.crt", "certs/.build-host-ca.pem"):
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
            assert ignored.returncode == 0, f".gitignore must keep {path} out of git"
    for stage in dockerfile().stages:
        if not _stage_uses_network(stage):
            continue
        copy_lines = [cp.line for cp in copies(stage) if cp.sources == [CERTS_DIR]]
        assert [cp.dest for cp in copies(stage) if cp.sources == [CERTS_DIR]] == [EXTRA_CA_DEST]
        first_download = min(
            i.line for i in stage.of("RUN") if "apt-get update" in i.args or "pip install" in i.args
        )
        assert copy_lines[0] < first_download, f"stage {stage.name} downloads before it has the certificates"


def test_pip_and_apt_trust_the_extra_certificates_at_build_time_only() -> None:
    df = dockerfile()
    builder_run = run_text(df.stage("builder"))
    # pip: the system bundle plus the extra files, for the RUN that downloads (export, not ENV).
    assert "export PIP_CERT=/tmp/build-ca.pem" in builder_run
    assert "*.pem" in builder_run
    assert "*.crt" in builder_run
    final = df.final
    (use,) = [i for i in final.of("RUN") if "/tmp/extra-ca" in i.args]
    assert 'Acquire::https::CaInfo "/tmp/build-ca.pem"' in use.args
    # The same RUN removes the copy, the bundle and apt's configuration: nothing left in the image.
    cleanup = use.args[use.args.rindex("rm -rf") :]
    for path in ("/tmp/extra-ca", "/tmp/build-ca.pem", "/etc/apt/apt.conf.d/00nightjar-build-ca"):
        assert path in cleanup.split(";")[0], f"line {use.line}: {path} stays in the image"
    # And nothing of the runtime stage points at them: no ENV, no ARG.
    for stage in (df.stage("builder"), final):
        for name, value in stage.variables.items():
            assert name not in {"PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
            assert "extra-ca" not in value
            assert "build-ca" not in value


def _client_check(majors: str) -> str:
    """The runtime stage's check that each major of PG_MAJORS has a client package, as a shell
    script of its own (taken from the RUN, with PG_MAJORS set to ``majors``)."""
    final = dockerfile().final
    (ins,) = [i for i in final.of("RUN") if "postgresql-client-$major" in i.args and "apt-cache" in i.args]
    text = substitute(ins.args, {**final.variables, "PG_MAJORS": majors})
    m = re.search(r'(missing="";.*?exit 1; fi;)', text)
    assert m, f"line {ins.line}: no check of the client packages before the install"
    assert text.index(m.group(1)) < text.index("apt-get install -y --no-install-recommends $pkgs")
    return m.group(1)


@pytest.mark.parametrize(
    ("majors", "available", "fails_naming"),
    [
        ("15", {"15": "15.13-0+deb12u1"}, None),
        ("15 16 17", {"15": "15.13-0+deb12u1", "16": "16.9-1.pgdg120+1", "17": "17.5-1.pgdg120+1"}, None),
        ("14 15 16", {"15": "15.13-0+deb12u1"}, ["14", "16"]),
        ("12", {}, ["12"]),
    ],
)
def test_a_client_that_cannot_be_installed_fails_the_build_naming_its_major(
    tmp_path: Path, majors: str, available: dict[str, str], fails_naming: list[str] | None
) -> None:
    """Run the check itself with an apt-cache that knows only ``available`` (as when PGDG is
    unreachable and only Debian's postgresql-client-15 exists): it must exit non-zero naming every
    missing major, and pass quietly otherwise."""
    apt_cache = tmp_path / "apt-cache"
    cases = "".join(f'  "postgresql-client-{m}") echo "  Candidate: {v}";;\n' for m, v in available.items())
    apt_cache.write_text(
        '#!/bin/sh\n[ "$1" = policy ] || exit 2\necho "$2:"\necho "  Installed: (none)"\n'
        f'case "$2" in\n{cases}  *) echo "  Candidate: (none)";;\nesac\n'
    )
    apt_cache.chmod(0o755)
    preamble = 'set -eu; pgdg=unreachable; PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'
    script = f"{preamble}; {_client_check(majors)}"
    result = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    if fails_naming is None:
        assert result.returncode == 0, result.stderr
        for m, v in available.items():
            assert f"postgresql-client-{m} {v}" in result.stdout
        return
    assert result.returncode != 0, "a missing client must fail the build"
    error = result.stderr.splitlines()[0]
    assert f"major(s) {' '.join(fails_naming)} " in error, error
    assert "PGDG repository unreachable" in error


def test_an_unreachable_pgdg_is_said_and_not_hidden() -> None:
    run = run_text(dockerfile().final)
    assert "apt.postgresql.org*Packages*" in run, "the build tells whether PGDG was reached"
    install = next(c for c in run.split(";") if "apt-get install -y --no-install-recommends $pkgs" in c)
    assert "||" not in install, "a failed install must fail the build"


def test_dependencies_are_installed_in_a_layer_before_the_code() -> None:
    """A change to operator/ (or README.md) must not reinstall the dependencies: they come from
    pyproject.toml alone, at constraints.txt's versions, in a RUN before the code is copied; the
    code's own install needs no network."""
    builder = dockerfile().stage("builder")
    ins = builder.instructions
    deps_at = next(
        n for n, i in enumerate(ins) if i.keyword == "RUN" and "-r /tmp/requirements.txt" in i.args
    )
    code_at = next(n for n, i in enumerate(ins) if i.keyword == "COPY" and "operator" in i.args.split())
    assert deps_at < code_at
    before = [cp.sources for cp in copies(Stage(0, "b", "", instructions=ins[:deps_at]))]
    assert sorted(before) == [[CERTS_DIR], ["pyproject.toml", "constraints.txt"]], (
        f"copied before the dependencies: {before}"
    )
    assert "-c constraints.txt -r /tmp/requirements.txt" in ins[deps_at].args, "pinned: no backtracking"
    (install,) = [i for i in ins[code_at:] if i.keyword == "RUN" and "pip install" in i.args]
    assert "--no-deps" in install.args
    assert "--no-build-isolation" in install.args
    assert "pip check" in install.args
    # The requirements the dependency layer installs are exactly pyproject's.
    m = re.search(r"python -c '([^']+)' > /tmp/requirements.txt", ins[deps_at].args)
    assert m, "the dependency layer reads its requirements from pyproject.toml"
    out = subprocess.run(
        ["python3", "-c", m.group(1)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    project = pyproject()
    assert [r for r in out if r] == project["build-system"]["requires"] + project["project"]["dependencies"]
