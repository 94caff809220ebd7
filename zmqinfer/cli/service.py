"""`zmqinfer service install|uninstall|start|stop|restart|status|logs`: a node or the gateway
under this machine's service manager (the `brew services` verbs).

`install` renders the template of its role from the checkout's launchd/ (macOS LaunchAgent) or
systemd/ (Linux user unit; `--system`: a hardened system unit) folder with this machine's
absolute paths, writes it and loads it; `uninstall` undoes that. `stop` keeps a service stopped
(also across logins and boots) until `start`. `--dry-run` prints the file and the commands and
changes nothing. The templates are read from the checkout, not shipped as package data: the
service runs the checkout's own bin/zmqinfer, so it cannot exist without the checkout, and one
copy of each template means the files a user reads in the repo are the files that get installed.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import pwd
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zmqinfer.config import ConfigError, load_cluster

Platform = Literal["darwin", "linux"]
Role = Literal["node", "gateway"]
VERBS = ("install", "uninstall", "start", "stop", "restart", "status", "logs")

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bin/, launchd/, systemd/
LABEL_PREFIX = "org.zmqinfer"
LOG_TAIL_LINES = 100  # `service logs` without -n: a screenful and a half
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # config.py's node names: safe in paths
_MANAGED = ("--name", "--config", "--log-file")  # flags the service sets itself
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")  # in the templates: @ROOT@, @LABEL@, ...


class ServiceError(RuntimeError):
    """A service manager refused; the message names the command and what it said."""


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


def add_commands(sub: Any) -> None:
    p = sub.add_parser("service", help="run a node or the gateway as a service (launchd / systemd)",
                       description="install|uninstall|start|stop|restart|status|logs a node or the "
                                   "gateway under launchd (macOS) or systemd (Linux). install: flags "
                                   "after -- go to the node / gateway, e.g. -- --memory-limit 8G")
    p.add_argument("verb", choices=VERBS, metavar="ACTION", help=" | ".join(VERBS))
    p.add_argument("--role", choices=("node", "gateway"), default="node", help="default node")
    p.add_argument("--name", default=None, help="the node's id, as in nodes.toml (nodes only)")
    p.add_argument("--config", type=Path, default=None,
                   help="nodes.toml (a node's is optional; the gateway's defaults to ./nodes.toml)")
    p.add_argument("--system", action="store_true", help="Linux: a hardened system unit in "
                   "/etc/systemd/system (needs root), not a user unit")
    p.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
    p.add_argument("-n", "--lines", type=int, default=LOG_TAIL_LINES, help="logs: lines to show")
    p.add_argument("-f", "--follow", action="store_true", help="logs: keep following")
    p.add_argument("--platform", choices=("darwin", "linux"), default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_service)


def cmd_service(args: argparse.Namespace) -> int:
    svc = _service(args)
    try:
        return Manager(svc, dry_run=args.dry_run).do(args)
    except ServiceError as e:
        print(f"zmqinfer: {e}", file=sys.stderr)
        return 1


def _service(args: argparse.Namespace) -> Service:
    platform = args.platform or {"darwin": "darwin", "linux": "linux"}.get(sys.platform)
    if platform is None:
        raise ConfigError(f"service: launchd (macOS) and systemd (Linux) only, not {sys.platform}")
    if args.system and platform != "linux":
        raise ConfigError("--system is for Linux (systemd); on macOS the service is a LaunchAgent")
    if args.role == "node":
        if not args.name:
            raise ConfigError("service --role node needs --name NAME (this node's id, as in nodes.toml)")
        if not _NAME.match(args.name):
            raise ConfigError(f"--name {args.name!r}: use letters, digits, '.', '_', '-'")
    elif args.name:
        raise ConfigError("--name is for nodes; there is one gateway per machine")
    if args.passthrough and args.verb != "install":
        raise ConfigError(f"extra arguments {' '.join(args.passthrough)!r} are for install only")
    if args.lines < 1:
        raise ConfigError(f"--lines {args.lines}: at least 1")
    return Service(platform, args.role, args.name, args.system)


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


# ---- rendering ----------------------------------------------------------------------------


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


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", str(os.getuid()))


# ---- the service managers -----------------------------------------------------------------


class Manager:
    """The commands of each verb, for launchctl or systemctl. With dry_run it prints them (and
    the file install would write) and runs nothing, not even a query."""

    def __init__(self, svc: Service, *, dry_run: bool = False) -> None:
        self.svc, self.dry_run = svc, dry_run
        self.uid = os.getuid()

    def do(self, args: argparse.Namespace) -> int:
        verb: str = args.verb
        if verb == "install":
            return self.install(render(self.svc, program_args(self.svc, args.config, args.passthrough)))
        if verb == "logs":
            return self.logs(args.lines, args.follow)
        if verb not in ("uninstall", "status") and not self.dry_run and not self.svc.path().exists():
            raise ServiceError(f"{self.svc.path()} is not installed: run `zmqinfer service install` first")
        return getattr(self, verb)()

    # launchd: gui/<uid> in a login session; over SSH there is none, and Homebrew falls back to
    # user/<uid> (the per-user domain that exists without a GUI login).
    def domain(self) -> str:
        gui = f"gui/{self.uid}"
        if self.dry_run or self.call(["launchctl", "print", gui], quiet=True) == 0:
            return gui
        return f"user/{self.uid}"

    def target(self) -> str:
        return f"{self.domain()}/{self.svc.label}"

    def systemctl(self, *args: str) -> list[str]:
        return ["systemctl", *([] if self.svc.system else ["--user"]), *args]

    def install(self, content: bytes) -> int:
        path, again = self.svc.path(), self.svc.path().exists()
        if self.svc.platform == "darwin":
            target = self.target()
            if again:
                self.call(["launchctl", "bootout", target], quiet=True)  # not loaded is fine
            self.write(path, content)
            if not self.dry_run:
                log_dir().mkdir(parents=True, exist_ok=True)
            self.check(["launchctl", "enable", target])
            self.check(["launchctl", "bootstrap", target.rsplit("/", 1)[0], str(path)])
        else:
            self.write(path, content)
            if not self.svc.system:  # a user's units run only while they are logged in, unless lingering
                self.check(["loginctl", "enable-linger", user_name()])
            self.check(self.systemctl("daemon-reload"))
            self.check(self.systemctl("enable", "--now", self.svc.unit))
            if again:  # enable --now leaves a running old version running
                self.check(self.systemctl("restart", self.svc.unit))
        self.say(f"installed {self.svc.role}{' ' + self.svc.name if self.svc.name else ''}: {path}")
        return 0

    def uninstall(self) -> int:
        path = self.svc.path()
        if self.svc.platform == "darwin":
            self.call(["launchctl", "bootout", self.target()], quiet=True)  # not loaded is fine
            self.remove(path)
        else:
            self.call(self.systemctl("disable", "--now", self.svc.unit), quiet=True)
            self.remove(path)
            self.check(self.systemctl("daemon-reload"))
        self.say(f"uninstalled {path}")
        return 0

    def start(self) -> int:
        if self.svc.platform == "darwin":
            target = self.target()
            self.check(["launchctl", "enable", target])
            if self.call(["launchctl", "bootstrap", target.rsplit("/", 1)[0], str(self.svc.path())]) != 0:
                self.check(["launchctl", "kickstart", target])  # it was loaded already
        else:
            self.check(self.systemctl("enable", "--now", self.svc.unit))
        return 0

    def stop(self) -> int:
        # Stopped until `start`, also across logins and reboots: disable, then unload.
        if self.svc.platform == "darwin":
            target = self.target()
            self.check(["launchctl", "disable", target])
            self.call(["launchctl", "bootout", target], quiet=True)  # not loaded is fine
        else:
            self.check(self.systemctl("disable", "--now", self.svc.unit))
        return 0

    def restart(self) -> int:
        if self.svc.platform == "darwin":
            return self.check(["launchctl", "kickstart", "-k", self.target()])
        return self.check(self.systemctl("restart", self.svc.unit))

    def status(self) -> int:
        if self.svc.platform == "darwin":
            return self.call(["launchctl", "print", self.target()])
        return self.call(self.systemctl("status", "--no-pager", self.svc.unit))

    def logs(self, lines: int, follow: bool) -> int:
        if self.svc.platform == "linux":
            cmd = ["journalctl", *([] if self.svc.system else ["--user"]), "-u", self.svc.unit,
                   "-n", str(lines), "--no-pager"]
            return self.call(cmd + (["-f"] if follow else []))
        files = [f for f in (self.svc.log_file(), log_dir() / f"{self.svc.label}.err.log")
                 if self.dry_run or f.exists()]
        if not files:
            raise ServiceError(f"no log yet at {self.svc.log_file()}: is the service installed and started?")
        if follow or self.dry_run:
            return self.call(["tail", "-n", str(lines), *(["-F"] if follow else []), *map(str, files)])
        for f in files:
            if len(files) > 1:
                print(f"==> {f} <==")
            print("".join(_tail(f, lines)), end="")
        return 0

    # ---- running things ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(("would have " if self.dry_run else "") + text)

    def write(self, path: Path, content: bytes) -> None:
        if self.dry_run:
            print(f"# {path}\n{content.decode()}")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(content)
        tmp.replace(path)  # never a half-written file for the service manager to read

    def remove(self, path: Path) -> None:
        if self.dry_run:
            print(f"$ rm -f {path}")
        else:
            path.unlink(missing_ok=True)

    def call(self, cmd: list[str], *, quiet: bool = False) -> int:
        """Run `cmd`; its exit status. quiet: its output is not shown (a query or an undo)."""
        if self.dry_run:
            print("$ " + " ".join(cmd))
            return 0
        try:
            done = subprocess.run(cmd, env=self.env(), stdin=subprocess.DEVNULL,
                                  capture_output=quiet, text=True)
        except FileNotFoundError:
            raise ServiceError(f"{cmd[0]} not found: is this a {self.manager_name()} system?") from None
        return done.returncode

    def check(self, cmd: list[str]) -> int:
        if self.dry_run:
            return self.call(cmd)
        try:
            done = subprocess.run(cmd, env=self.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except FileNotFoundError:
            raise ServiceError(f"{cmd[0]} not found: is this a {self.manager_name()} system?") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()
            raise ServiceError(f"`{' '.join(cmd)}` failed (exit status {done.returncode})"
                               + (f": {said}" if said else ""))
        return 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Over SSH or sudo XDG_RUNTIME_DIR may be missing, and `systemctl --user` cannot find
        # the user's manager without it.
        if self.svc.platform == "linux" and not self.svc.system:
            env.setdefault("XDG_RUNTIME_DIR", f"/run/user/{self.uid}")
        return env

    def manager_name(self) -> str:
        return "launchd" if self.svc.platform == "darwin" else "systemd"


def _tail(path: Path, lines: int) -> list[str]:
    from collections import deque

    with path.open(errors="replace") as f:
        return list(deque(f, maxlen=lines))
