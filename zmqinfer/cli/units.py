"""The service files of `zmqinfer service`: which file a node or the gateway gets on this
machine, and its text, rendered from the checkout's launchd/ and systemd/ templates.

The templates are read from the checkout, not shipped as package data: the service runs the
checkout's own bin/zmqinfer, so it cannot exist without the checkout, and one copy of each
template means the files a user reads in the repo are the files that get installed. A plist is
rendered through plistlib (escaping is its job); a unit by text, every ExecStart word quoted.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zmqinfer.config import ConfigError, load_cluster

Platform = Literal["darwin", "linux"]
Role = Literal["node", "gateway"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bin/, launchd/, systemd/
LABEL_PREFIX = "org.zmqinfer"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # config.py's node names: safe in paths
_MANAGED = ("--name", "--config", "--log-file")  # flags the service sets itself
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")  # in the templates: @ROOT@, @LABEL@, ...


@dataclass(frozen=True)
class Service:
    platform: Platform
    role: Role
    name: str | None  # the node's id; None for the gateway
    system: bool = False  # Linux: a system unit in /etc/systemd/system, not a user unit

    @property
    def label(self) -> str:
        return f"{LABEL_PREFIX}.{self.role}" + (f".{self.name}" if self.name else "")

    @property
    def unit(self) -> str:
        return f"zmqinfer-{self.role}" + (f"-{self.name}" if self.name else "") + ".service"

    def path(self) -> Path:
        if self.platform == "darwin":
            return Path.home() / "Library" / "LaunchAgents" / f"{self.label}.plist"
        if self.system:
            return SYSTEM_UNIT_DIR / self.unit
        return Path.home() / ".config" / "systemd" / "user" / self.unit

    def log_file(self) -> Path:
        """The program's own rotating log (macOS; journald keeps Linux's)."""
        return log_dir() / f"{self.label}.log"


def log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "zmqinfer"


def program_args(svc: Service, config: Path | None, extra: list[str]) -> list[str]:
    """What follows `zmqinfer node|gateway` (the templates add --log-file themselves)."""
    for flag in extra:
        if flag.split("=", 1)[0] in _MANAGED:
            raise ConfigError(f"{flag.split('=', 1)[0]} is set by the service itself: give it as "
                              "`service install --name/--config`, not after --")
    if config is None and svc.role == "gateway":
        config = Path("nodes.toml")
    if config is not None:
        config = config.expanduser().resolve()
        if not config.is_file():
            raise ConfigError(f"--config {config}: no such file")
        cfg = load_cluster(config)  # a broken file fails now, not in a restart loop
        if svc.name is not None:
            cfg.node(svc.name)
    out = ["--name", svc.name] if svc.name else []
    return out + (["--config", str(config)] if config else []) + list(extra)


def launcher() -> Path:
    exe = ROOT / "bin" / "zmqinfer"
    if not exe.is_file():
        raise ConfigError(f"{exe} is missing: run the service from a zmqinfer checkout")
    return exe


def template(svc: Service) -> Path:
    if svc.platform == "darwin":
        path = ROOT / "launchd" / f"zmqinfer-{svc.role}.plist"
    else:
        path = ROOT / "systemd" / ("system" if svc.system else "") / f"zmqinfer-{svc.role}.service"
    if not path.is_file():
        raise ConfigError(f"template {path} is missing: is this a complete zmqinfer checkout?")
    return path


def render(svc: Service, args: list[str]) -> bytes:
    values = {"ROOT": str(ROOT), "ZMQINFER": str(launcher()), "LABEL": svc.label, "NAME": svc.name or "",
              "LOG_DIR": str(log_dir()), "LOG_FILE": str(svc.log_file()), "PATH": os.environ.get("PATH", ""),
              "USER": checkout_owner()}
    if svc.platform == "darwin":
        return render_plist(template(svc).read_bytes(), values, args)
    return render_unit(template(svc).read_text(), values, [values["ZMQINFER"], svc.role, *args]).encode()


def render_plist(text: bytes, values: dict[str, str], args: list[str]) -> bytes:
    """Through plistlib, not text substitution: escaping is plistlib's job, and the result is a
    valid plist whatever a path contains. "@ARGS@" alone in an array becomes `args`."""

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], v)
        if isinstance(v, list):
            return [y for x in v for y in (args if x == "@ARGS@" else [sub(x)])]
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    return plistlib.dumps(sub(plistlib.loads(text)), sort_keys=False)


def render_unit(text: str, values: dict[str, str], exec_args: list[str]) -> str:
    values = {**values, "EXEC": " ".join(systemd_quote(a) for a in exec_args)}
    # Values in other keys are paths and names: escape systemd's specifier character there too.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) == "EXEC"
                            else values[m.group(1)].replace("%", "%%"), text)


def systemd_quote(arg: str) -> str:
    """One ExecStart word: double-quoted, with systemd's escapes ("%" specifiers, "$" variables)."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def checkout_owner() -> str:
    """The system unit's User=: whoever owns the checkout (not root, who runs the install)."""
    uid = ROOT.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
