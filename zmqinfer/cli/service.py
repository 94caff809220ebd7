"""`zmqinfer service install|uninstall|start|stop|restart|status|logs`: a node or the gateway
under this machine's service manager (the `brew services` verbs).

`install` renders the file of its role (units.py: a launchd LaunchAgent on macOS, a systemd user
unit on Linux, `--system`: a hardened system unit), writes it and loads it; `uninstall` undoes
that. `stop` keeps a service stopped (also across logins and boots) until `start`. `--dry-run`
prints the file and the commands and changes nothing, not even a query.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

from zmqinfer.cli.units import NAME, Platform, Service, log_dir, program_args, render
from zmqinfer.config import ConfigError

VERBS = ("install", "uninstall", "start", "stop", "restart", "status", "logs")
LOG_TAIL_LINES = 100  # `service logs` without -n: a screenful and a half


class ServiceError(RuntimeError):
    """A service manager refused; the message names the command and what it said."""


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
    here: Platform | None = ("darwin" if sys.platform == "darwin"
                             else "linux" if sys.platform.startswith("linux") else None)
    platform: Platform | None = args.platform or here
    if platform is None:
        raise ConfigError(f"service: launchd (macOS) and systemd (Linux) only, not {sys.platform}")
    if args.system and platform != "linux":
        raise ConfigError("--system is for Linux (systemd); on macOS the service is a LaunchAgent")
    if args.role == "node":
        if not args.name:
            raise ConfigError("service --role node needs --name NAME (this node's id, as in nodes.toml)")
        if not NAME.match(args.name):
            raise ConfigError(f"--name {args.name!r}: use letters, digits, '.', '_', '-'")
    elif args.name:
        raise ConfigError("--name is for nodes; there is one gateway per machine")
    if args.passthrough and args.verb != "install":
        raise ConfigError(f"extra arguments {' '.join(args.passthrough)!r} are for install only")
    if args.lines < 1:
        raise ConfigError(f"--lines {args.lines}: at least 1")
    return Service(platform, args.role, args.name, args.system)


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
                self.linger()
            self.check(self.systemctl("daemon-reload"))
            self.check(self.systemctl("enable", "--now", self.svc.unit))
            if again:  # enable --now leaves a running old version running
                self.check(self.systemctl("restart", self.svc.unit))
        self.say(f"installed {self.svc.role}{' ' + self.svc.name if self.svc.name else ''}: {path}")
        return 0

    def linger(self) -> None:
        """Without lingering a user's units stop at logout and do not start at boot. Not fatal:
        some systems let only an administrator turn it on (polkit); the service still runs."""
        try:
            self.check(["loginctl", "enable-linger", user_name()])
        except ServiceError as e:
            print(f"zmqinfer: warning: {e}\n  the service runs only while {user_name()} is logged in; "
                  f"an administrator can run: sudo loginctl enable-linger {user_name()}", file=sys.stderr)

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
            bootstrap = ["launchctl", "bootstrap", target.rsplit("/", 1)[0], str(self.svc.path())]
            if self.call(bootstrap, quiet=True) != 0:
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)  # never a half-written file for the service manager to read
        except OSError as e:
            hint = " (a system unit needs root: sudo)" if self.svc.system else ""
            raise ServiceError(f"cannot write {path}: {e.strerror}{hint}") from None

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
