"""Which PostgreSQL client (pg_dump, pg_restore, psql) to run against a server.

The image carries several client majors side by side, as Debian and the PGDG repository lay them
out: ``<root>/<major>/bin/pg_dump`` (root ``/usr/lib/postgresql``). Like CloudNativePG, the agent
runs the client of the server's own major:

- ``pg_dump`` of the server's major writes the archive version that major writes (pg_dump 12 to
  15 write 1.14, which Mendix Cloud takes; 16 writes 1.15, 17 writes 1.16), where a newer
  pg_dump would write its own, newer one;
- ``pg_restore`` of the server's major sends only statements that server knows (pg_restore 17
  starts with ``SET transaction_timeout = 0``, which servers before 17 reject).

An explicit directory (``NIGHTJAR_PG_BINDIR``) overrides the choice. Without the server's major,
the closest installed major above it is used (the closest, not the newest: its archive version
and the statements its pg_restore sends are the nearest to what the server knows): pg_dump reads
older servers, but pg_restore into an older server may then fail, so the choice carries a
warning. A server newer than every installed client is refused: pg_dump refuses to dump a
server newer than itself.

No clients, no processes: :func:`installed_majors` and :func:`probe_bindir` only look at the
filesystem; running psql and the tools is the agent's (``nightjar.agent.pgtools``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Where Debian and PGDG install each major's client: ``<root>/<major>/bin``.
DEFAULT_ROOT = "/usr/lib/postgresql"

#: The newest pg_dump custom-format archive version each client major reads (and writes), from
#: ``K_VERS_MINOR`` in pg_backup_archiver.h; majors after the last one listed are not known here.
ARCHIVE_VERSION_BY_MAJOR: Mapping[int, tuple[int, int]] = {
    11: (1, 13),
    12: (1, 14),
    13: (1, 14),
    14: (1, 14),
    15: (1, 14),
    16: (1, 15),
    17: (1, 16),
}

OVERRIDE = "override"
SAME_MAJOR = "server major"
NEWER_MAJOR = "newer major"


class NoSuitableClient(ValueError):
    """No installed client may be used for the server; the message says why and what is there."""


@dataclass(frozen=True)
class ClientChoice:
    bindir: Path
    #: The client's major; None for an override (its major is not looked at).
    major: int | None
    #: How it was chosen: OVERRIDE, SAME_MAJOR or NEWER_MAJOR.
    reason: str
    #: Non-empty when the choice may fail (a restore with a newer client than the server).
    warning: str = ""
    #: The server's version it was chosen for; None for an override.
    server_version_num: int | None = None


def server_major(server_version_num: int) -> int:
    """The major of a ``server_version_num`` (150008 -> 15; 90624 -> 9, i.e. any 9.x)."""
    if server_version_num < 10000:
        raise ValueError(f"implausible server_version_num {server_version_num}")
    return server_version_num // 10000


def major_of_version(text: str) -> int | None:
    """The major of a version as a dump's header writes it: "15.18 (Debian 15.18-0+deb12u1)" -> 15,
    "9.6.24" -> 9; None when ``text`` does not start with a version."""
    m = re.match(r"\s*(\d+)(?:\.\d+)*", text or "")
    return int(m.group(1)) if m else None


def format_server_version(server_version_num: int) -> str:
    """``server_version_num`` as people write it: 150008 -> "15.8", 90624 -> "9.6.24"."""
    if server_version_num >= 100000:
        return f"{server_version_num // 10000}.{server_version_num % 10000}"
    major, rest = divmod(server_version_num, 10000)
    return f"{major}.{rest // 100}.{rest % 100}"


def parse_server_version_num(text: str) -> int:
    """The output of ``psql -XAtqc 'show server_version_num'`` as an int; ValueError otherwise."""
    value = text.strip()
    if not re.fullmatch(r"\d{5,7}", value):
        raise ValueError(f"expected a server_version_num, got {value[:80]!r}")
    number = int(value)
    server_major(number)
    return number


def installed_majors(root: str | Path, tool: str = "pg_dump") -> dict[int, Path]:
    """The client majors under ``root``: each ``<root>/<N>/bin`` that holds ``tool``, by N."""
    base = Path(root)
    found: dict[int, Path] = {}
    try:
        children = list(base.iterdir())
    except OSError:
        return found
    for child in children:
        if re.fullmatch(r"\d+", child.name) and (child / "bin" / tool).is_file():
            found[int(child.name)] = child / "bin"
    return dict(sorted(found.items()))


def _as_mapping(installed: Mapping[int, Path] | Iterable[int], root: str | Path) -> dict[int, Path]:
    if isinstance(installed, Mapping):
        return {int(k): Path(v) for k, v in installed.items()}
    return {int(m): Path(root) / str(m) / "bin" for m in installed}


def _majors_text(majors: Iterable[int]) -> str:
    listed = sorted(majors)
    return ", ".join(str(m) for m in listed) if listed else "none"


def choose_client(
    server_version_num: int | None,
    installed: Mapping[int, Path] | Iterable[int],
    override: str | None = None,
    *,
    tool: str = "pg_dump",
    root: str | Path = DEFAULT_ROOT,
) -> ClientChoice:
    """The client to run ``tool`` with against a server of ``server_version_num``.

    ``installed`` maps majors to their bin directories (:func:`installed_majors`), or lists the
    majors under ``root``. An override (a non-empty NIGHTJAR_PG_BINDIR) wins and needs no
    server version; otherwise the server's own major, else the closest installed major above it.
    """
    if override:
        return ClientChoice(Path(override), None, OVERRIDE)
    majors = _as_mapping(installed, root)
    if server_version_num is None:
        raise NoSuitableClient(
            f"cannot choose a PostgreSQL client for {tool}: the server's version is not known"
        )
    major = server_major(server_version_num)
    version = format_server_version(server_version_num)
    if major in majors:
        return ClientChoice(majors[major], major, SAME_MAJOR, "", server_version_num)
    newer = [m for m in majors if m > major]
    if not newer:
        raise NoSuitableClient(
            f"no PostgreSQL client for server {version} in the agent image: installed client majors "
            f"{_majors_text(majors)} ({tool} needs its server's major or a newer one); use an image "
            "with that major's client, or set NIGHTJAR_PG_BINDIR to its bin directory"
        )
    chosen = min(newer)
    warning = ""
    if tool == "pg_restore":
        warning = (
            f"pg_restore {chosen} restores into server {version}: no client of major {major} is "
            f"installed (installed: {_majors_text(majors)}), and pg_restore may send statements "
            f"a PostgreSQL {major} server does not know (pg_restore 17 sends "
            "SET transaction_timeout), which fails the restore before it changes anything"
        )
    elif tool == "pg_dump":
        warning = (
            f"pg_dump {chosen} dumps server {version}: no client of major {major} is installed "
            f"(installed: {_majors_text(majors)}); the archive has pg_dump {chosen}'s format, "
            f"which pg_restore of major {major} may not read"
        )
    return ClientChoice(majors[chosen], chosen, NEWER_MAJOR, warning, server_version_num)


def choose_bindir(
    server_version_num: int | None,
    installed: Mapping[int, Path] | Iterable[int],
    override: str | None = None,
    *,
    tool: str = "pg_dump",
    root: str | Path = DEFAULT_ROOT,
) -> Path:
    """The bin directory of :func:`choose_client`'s choice."""
    return choose_client(server_version_num, installed, override, tool=tool, root=root).bindir


def probe_bindir(installed: Mapping[int, Path], tool: str = "psql") -> Path | None:
    """The bin directory whose ``tool`` asks the server its version: the newest installed major's
    (a newer libpq talks to every older server). None when no major has it."""
    for major in sorted(installed, reverse=True):
        if (Path(installed[major]) / tool).is_file():
            return Path(installed[major])
    return None


def parse_archive_version(text: str) -> tuple[int, int] | None:
    """ "1.16" or "1.14.0" -> (1, 16); None for anything else."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def unreadable_archive(archive_version: str, choice: ClientChoice, pg_dump_version: str = "") -> str:
    """Why the chosen pg_restore cannot read a dump of ``archive_version``, or "" when it can (or
    when that is not known: an override, an unknown major or archive version)."""
    wanted = parse_archive_version(archive_version)
    if wanted is None or choice.major is None or choice.major not in ARCHIVE_VERSION_BY_MAJOR:
        return ""
    if wanted <= ARCHIVE_VERSION_BY_MAJOR[choice.major]:
        return ""
    writers = sorted(m for m, v in ARCHIVE_VERSION_BY_MAJOR.items() if v >= wanted)
    by = (
        f"pg_dump {pg_dump_version}"
        if pg_dump_version
        else (f"pg_dump {writers[0]} or later" if writers else "a newer pg_dump")
    )
    server = (
        f"server {format_server_version(choice.server_version_num)}"
        if choice.server_version_num is not None
        else "server"
    )
    return (
        f"the dump has archive version {archive_version} (written by {by}), which pg_restore "
        f"{choice.major}, chosen for the {server}, cannot read: a dump taken with a newer "
        "PostgreSQL major's client cannot be restored into an older server"
    )
