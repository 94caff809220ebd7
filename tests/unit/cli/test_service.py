"""`zmqinfer service`: the rendered plists and units, and install/uninstall and the other verbs
against recording stubs of launchctl, systemctl, loginctl and journalctl (the real service
managers cannot run in CI), for both flavours on this Linux machine via the hidden --platform.

The command runs as a real subprocess with a temporary HOME and the stubs first on PATH, so the
files land where a user's would and every call goes through PATH as it would for real.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from zmqinfer.cli import units
from zmqinfer.cli.units import ROOT, Service
from zmqinfer.gateway.process import SHUTDOWN_GRACE_S
from zmqinfer.node.process import DRAIN_TIMEOUT_S

UID = os.getuid()
USER = pwd.getpwuid(UID).pw_name
LAUNCHER = str(ROOT / "bin" / "zmqinfer")
CMD_TIMEOUT_S = 60  # one CLI run: imports and a few stub calls

# Each stub appends its name and arguments, tab-separated, to $ZQ_CALLS. ZQ_NO_GUI makes
# `launchctl print gui/<uid>` fail as it does over SSH; ZQ_FAIL="<tool>" (or "<tool> <verb>") makes
# that tool (verb) fail with a message on stderr; systemctl also records XDG_RUNTIME_DIR (which --user needs).
STUB = r"""#!/bin/sh
tool="$(basename "$0")"
{ printf '%s' "$tool"; for a in "$@"; do printf '\t%s' "$a"; done; printf '\n'; } >> "$ZQ_CALLS"
if [ "$tool" = systemctl ]; then printf 'XDG_RUNTIME_DIR=%s\n' "${XDG_RUNTIME_DIR:-}" >> "$ZQ_CALLS.env"; fi
if [ "$tool" = launchctl ] && [ "$1" = print ] && [ -n "${ZQ_NO_GUI:-}" ]; then
    case "$2" in gui/*) echo "Bad request. Could not find domain for port identifier." >&2; exit 113 ;; esac
fi
case "${ZQ_FAIL:-}" in "$tool"|"$tool $1") echo "$tool: simulated failure: Access denied" >&2; exit 1 ;; esac
exit 0
"""


@dataclass
class Env:
    home: Path
    work: Path
    calls_file: Path
    env: dict[str, str]

    def run(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zmqinfer", "service", *args], cwd=self.work,
                              env={**self.env, **extra_env}, capture_output=True, text=True,
                              timeout=CMD_TIMEOUT_S)

    def calls(self) -> list[list[str]]:
        """The calls recorded since the last look (then forgotten)."""
        if not self.calls_file.exists():
            return []
        out = [line.split("\t") for line in self.calls_file.read_text().splitlines()]
        self.calls_file.unlink()
        return out

    def files(self) -> list[Path]:
        return sorted(p for p in self.home.rglob("*") if p.is_file())


@pytest.fixture
def sv(tmp_path: Path) -> Env:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("launchctl", "systemctl", "loginctl", "journalctl"):
        (stubs / tool).write_text(STUB)
        (stubs / tool).chmod(0o755)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / "nodes.toml").write_text('[gateway]\naddress = "127.0.0.1"\n\n[[node]]\nname = "n1"\n'
                                     'address = "127.0.0.1"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "ZQ_NO_GUI", "ZQ_FAIL")}
    env.update(HOME=str(home), PATH=f"{stubs}:{env['PATH']}", ZQ_CALLS=str(tmp_path / "calls"))
    return Env(home, work, tmp_path / "calls", env)


def agent(home: Path, label: str) -> Path:
    return home / "Library" / "LaunchAgents" / f"{label}.plist"


# ---- the rendered files ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["node", "gateway"])
def test_templates_are_plists_and_units(role: str) -> None:
    template = plistlib.loads((ROOT / "launchd" / f"zmqinfer-{role}.plist").read_bytes())
    assert template["ProgramArguments"][:2] == ["@ZMQINFER@", role]
    for unit in (ROOT / "systemd" / f"zmqinfer-{role}.service", ROOT / "systemd" / "system" / f"zmqinfer-{role}.service"):
        assert "ExecStart=@EXEC@" in unit.read_text().splitlines()


def test_node_plist_runs_this_checkouts_launcher(sv: Env) -> None:
    r = sv.run("install", "--platform", "darwin", "--name", "n1", "--config", "nodes.toml", "--",
               "--memory-limit", "8G")
    assert r.returncode == 0, r.stderr
    with agent(sv.home, "org.zmqinfer.node.n1").open("rb") as f:
        p = plistlib.load(f)
    logs = sv.home / "Library" / "Logs" / "zmqinfer"
    assert p["Label"] == "org.zmqinfer.node.n1"
    assert p["ProgramArguments"] == [LAUNCHER, "node", "--log-file", str(logs / "org.zmqinfer.node.n1.log"),
                                     "--name", "n1", "--config", str(sv.work / "nodes.toml"),
                                     "--memory-limit", "8G"]
    assert p["RunAtLoad"] is True and p["KeepAlive"] == {"SuccessfulExit": False}
    assert p["ProcessType"] == "Interactive" and p["ThrottleInterval"] >= 5
    assert p["ExitTimeOut"] > DRAIN_TIMEOUT_S  # launchd must not SIGKILL a draining node
    assert p["StandardOutPath"] == str(logs / "org.zmqinfer.node.n1.out.log")
    assert p["StandardErrorPath"] == str(logs / "org.zmqinfer.node.n1.err.log")
    assert p["EnvironmentVariables"]["PATH"] == sv.env["PATH"]
    assert p["WorkingDirectory"] == str(ROOT)
    assert logs.is_dir()  # launchd does not create the folder of StandardOutPath


def test_gateway_plist(sv: Env) -> None:
    r = sv.run("install", "--platform", "darwin", "--role", "gateway")  # ./nodes.toml by default
    assert r.returncode == 0, r.stderr
    p = plistlib.loads(agent(sv.home, "org.zmqinfer.gateway").read_bytes())
    assert p["ProgramArguments"] == [
        LAUNCHER, "gateway", "--log-file", str(sv.home / "Library/Logs/zmqinfer/org.zmqinfer.gateway.log"),
        "--config", str(sv.work / "nodes.toml")]
    assert p["ExitTimeOut"] > SHUTDOWN_GRACE_S


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if sys.platform.startswith("linux"):
            pytest.fail("systemd-analyze is missing: apt-get install systemd (.ci/run does)")
        pytest.skip("systemd-analyze exists on Linux only")
    return exe


@pytest.mark.parametrize("system", [False, True], ids=["user", "system"])
@pytest.mark.parametrize("role", ["node", "gateway"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, role: str, system: bool) -> None:
    # A config path with a space, % and $ proves the ExecStart quoting, not just the happy path.
    cfg = tmp_path / "my 100% $HOME" / "nodes.toml"
    cfg.parent.mkdir()
    cfg.write_text('[[node]]\nname = "n1"\naddress = "127.0.0.1"\n')
    svc = Service("linux", role, "n1" if role == "node" else None, system)  # type: ignore[arg-type]
    text = units.render(svc, units.program_args(svc, cfg, ["--port", "9000"])).decode()
    unit = tmp_path / svc.unit
    unit.write_text(text)
    runtime = tmp_path / "run"  # --user needs a runtime dir; it only has to exist
    runtime.mkdir(mode=0o700)
    cmd = [systemd_analyze(), "verify", *([] if system else ["--user"]), str(unit)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), text  # no warning either
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_line.removeprefix("ExecStart="))]
    expected = ["--name", "n1"] if role == "node" else []
    assert words == [LAUNCHER, role, *expected, "--config", str(cfg), "--port", "9000"]
    keys = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["Restart"] == "on-failure" and int(keys["RestartSec"]) > 0
    assert int(keys["TimeoutStopSec"]) > (DRAIN_TIMEOUT_S if role == "node" else SHUTDOWN_GRACE_S)
    assert keys["After"] == keys["Wants"] == "network-online.target"
    if system:
        assert keys["User"] == pwd.getpwuid(ROOT.stat().st_uid).pw_name
        assert set(keys["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}
        assert "MemoryDenyWriteExecute" not in keys and "PrivateDevices" not in keys  # mlx JIT, GPUs
        assert keys["NoNewPrivileges"] == "yes"


# ---- install and uninstall, both flavours --------------------------------------------------------


def test_launchd_round_trip(sv: Env) -> None:
    label = "org.zmqinfer.node.n1"
    plist = agent(sv.home, label)
    assert sv.run("install", "--platform", "darwin", "--name", "n1").returncode == 0
    assert plist.is_file()
    assert sv.calls() == [["launchctl", "print", f"gui/{UID}"],
                          ["launchctl", "enable", f"gui/{UID}/{label}"],
                          ["launchctl", "bootstrap", f"gui/{UID}", str(plist)]]
    r = sv.run("install", "--platform", "darwin", "--name", "n1")  # again: unload the old one first
    assert r.returncode == 0, r.stderr
    assert sv.calls()[1] == ["launchctl", "bootout", f"gui/{UID}/{label}"]
    assert sv.run("uninstall", "--platform", "darwin", "--name", "n1").returncode == 0
    assert sv.calls() == [["launchctl", "print", f"gui/{UID}"], ["launchctl", "bootout", f"gui/{UID}/{label}"]]
    assert not plist.exists()


def test_launchd_without_a_gui_session_uses_the_user_domain(sv: Env) -> None:
    label = "org.zmqinfer.gateway"
    r = sv.run("install", "--platform", "darwin", "--role", "gateway", ZQ_NO_GUI="1")
    assert r.returncode == 0, r.stderr
    assert sv.calls() == [["launchctl", "print", f"gui/{UID}"],
                          ["launchctl", "enable", f"user/{UID}/{label}"],
                          ["launchctl", "bootstrap", f"user/{UID}", str(agent(sv.home, label))]]


def test_systemd_round_trip(sv: Env) -> None:
    unit = sv.home / ".config" / "systemd" / "user" / "zmqinfer-node-n1.service"
    r = sv.run("install", "--platform", "linux", "--name", "n1", "--config", "nodes.toml")
    assert r.returncode == 0, r.stderr
    assert f'"--config" "{sv.work / "nodes.toml"}"' in unit.read_text()
    assert sv.calls() == [["loginctl", "enable-linger", USER],
                          ["systemctl", "--user", "daemon-reload"],
                          ["systemctl", "--user", "enable", "--now", "zmqinfer-node-n1.service"]]
    # Over SSH XDG_RUNTIME_DIR may be unset; systemctl --user needs it to find the manager.
    assert set(Path(str(sv.calls_file) + ".env").read_text().split()) == {f"XDG_RUNTIME_DIR=/run/user/{UID}"}
    assert sv.run("install", "--platform", "linux", "--name", "n1").returncode == 0
    assert sv.calls()[-1] == ["systemctl", "--user", "restart", "zmqinfer-node-n1.service"]  # new file runs
    assert sv.run("uninstall", "--platform", "linux", "--name", "n1").returncode == 0
    assert sv.calls() == [["systemctl", "--user", "disable", "--now", "zmqinfer-node-n1.service"],
                          ["systemctl", "--user", "daemon-reload"]]
    assert not unit.exists() and sv.files() == []


LABEL, UNIT = "org.zmqinfer.node.n1", "zmqinfer-node-n1.service"
VERB_CALLS = {
    ("darwin", "start"): [["launchctl", "print", f"gui/{UID}"], ["launchctl", "enable", f"gui/{UID}/{LABEL}"],
                          ["launchctl", "bootstrap", f"gui/{UID}", "PLIST"]],
    ("darwin", "stop"): [["launchctl", "print", f"gui/{UID}"], ["launchctl", "disable", f"gui/{UID}/{LABEL}"],
                         ["launchctl", "bootout", f"gui/{UID}/{LABEL}"]],
    ("darwin", "restart"): [["launchctl", "print", f"gui/{UID}"], ["launchctl", "kickstart", "-k", f"gui/{UID}/{LABEL}"]],
    ("darwin", "status"): [["launchctl", "print", f"gui/{UID}"], ["launchctl", "print", f"gui/{UID}/{LABEL}"]],
    ("linux", "start"): [["systemctl", "--user", "enable", "--now", UNIT]],
    ("linux", "stop"): [["systemctl", "--user", "disable", "--now", UNIT]],
    ("linux", "restart"): [["systemctl", "--user", "restart", UNIT]],
    ("linux", "status"): [["systemctl", "--user", "status", "--no-pager", UNIT]],
    ("linux", "logs"): [["journalctl", "--user", "-u", UNIT, "-n", "7", "--no-pager"]],
}


@pytest.mark.parametrize("platform,verb", sorted(VERB_CALLS))
def test_verbs(sv: Env, platform: str, verb: str) -> None:
    assert sv.run("install", "--platform", platform, "--name", "n1").returncode == 0
    sv.calls()
    r = sv.run(verb, "--platform", platform, "--name", "n1", *(["-n", "7"] if verb == "logs" else []))
    assert r.returncode == 0, r.stderr
    plist = str(agent(sv.home, LABEL))
    assert sv.calls() == [[plist if a == "PLIST" else a for a in c] for c in VERB_CALLS[platform, verb]]


def test_launchd_start_of_a_loaded_agent_kickstarts_it(sv: Env) -> None:
    assert sv.run("install", "--platform", "darwin", "--name", "n1").returncode == 0
    sv.calls()
    r = sv.run("start", "--platform", "darwin", "--name", "n1", ZQ_FAIL="launchctl bootstrap")
    assert r.returncode == 0, r.stderr
    assert sv.calls()[-2:] == [["launchctl", "bootstrap", f"gui/{UID}", str(agent(sv.home, LABEL))],
                               ["launchctl", "kickstart", f"gui/{UID}/{LABEL}"]]
    assert "Access denied" not in r.stdout + r.stderr  # the expected refusal is not shown


def test_launchd_logs_tail_the_rotating_log(sv: Env) -> None:
    logs = sv.home / "Library" / "Logs" / "zmqinfer"
    logs.mkdir(parents=True)
    (logs / f"{LABEL}.log").write_text("".join(f'{{"event": "line {i}"}}\n' for i in range(150)))
    r = sv.run("logs", "--platform", "darwin", "--name", "n1", "-n", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f'{{"event": "line {i}"}}' for i in (147, 148, 149)]
    assert sv.calls() == []


def test_start_before_install_says_so(sv: Env) -> None:
    r = sv.run("start", "--platform", "linux", "--name", "n1")
    assert r.returncode == 1 and "not installed" in r.stderr and "service install" in r.stderr
    assert sv.calls() == []


@pytest.mark.parametrize("tool,platform", [("systemctl", "linux"), ("launchctl", "darwin")])
def test_a_failing_service_manager_is_reported(sv: Env, tool: str, platform: str) -> None:
    r = sv.run("install", "--platform", platform, "--name", "n1", ZQ_FAIL=tool)
    assert r.returncode == 1
    assert f"`{tool} " in r.stderr and "Access denied" in r.stderr and "Traceback" not in r.stderr


def test_no_lingering_is_a_warning_not_a_failure(sv: Env) -> None:
    # Some systems let only an administrator turn lingering on; the unit still works while logged in.
    r = sv.run("install", "--platform", "linux", "--name", "n1", ZQ_FAIL="loginctl")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and f"sudo loginctl enable-linger {USER}" in r.stderr
    assert sv.calls()[-1] == ["systemctl", "--user", "enable", "--now", "zmqinfer-node-n1.service"]


def test_a_file_that_cannot_be_written_is_reported(sv: Env) -> None:
    (sv.home / ".config").write_text("a file where the folder should be")
    r = sv.run("install", "--platform", "linux", "--name", "n1")
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    assert sv.calls() == []


@pytest.mark.parametrize("platform", ["darwin", "linux"])
@pytest.mark.parametrize("verb", ["install", "uninstall", "start", "stop", "restart", "status", "logs"])
def test_dry_run_changes_nothing(sv: Env, platform: str, verb: str) -> None:
    if verb != "install":  # something to uninstall / start / ...
        assert sv.run("install", "--platform", platform, "--name", "n1").returncode == 0
        sv.calls()
    before = {p: p.read_bytes() for p in sv.files()}
    r = sv.run(verb, "--platform", platform, "--name", "n1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert sv.calls() == []  # not even `launchctl print`
    assert {p: p.read_bytes() for p in sv.files()} == before
    assert "$ " in r.stdout  # the commands it would run
    if verb == "install":
        assert sv.files() == []
        assert (LAUNCHER in r.stdout) and (("<plist" in r.stdout) == (platform == "darwin"))


@pytest.mark.parametrize("args,message", [
    (["--role", "worker"], "invalid choice: 'worker'"),
    ([], "--role node needs --name"),
    (["--name", "a b"], "--name 'a b'"),
    (["--role", "gateway", "--name", "n1"], "--name is for nodes"),
    (["--role", "gateway", "--config", "missing.toml"], "missing.toml: no such file"),
    (["--name", "n1", "--config", "missing.toml"], "missing.toml: no such file"),
    (["--name", "n9", "--config", "nodes.toml"], "no [[node]] named 'n9'"),
    (["--name", "n1", "--", "--name", "n2"], "--name is set by the service itself"),
    (["--name", "n1", "--platform", "darwin", "--system"], "--system is for Linux"),
    (["--name", "n1", "-n", "0"], "--lines 0: at least 1"),
])
def test_bad_input_is_refused_clearly(sv: Env, args: list[str], message: str) -> None:
    r = sv.run("install", "--platform", "linux", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sv.calls() == [] and sv.files() == []


def test_gateway_without_a_config_here(sv: Env) -> None:
    (sv.work / "nodes.toml").unlink()
    r = sv.run("install", "--platform", "linux", "--role", "gateway")
    assert r.returncode == 2 and "nodes.toml: no such file" in r.stderr


def test_flags_after_the_double_dash_are_for_install_only(sv: Env) -> None:
    r = sv.run("restart", "--platform", "linux", "--name", "n1", "--", "--port", "9000")
    assert r.returncode == 2 and "are for install only" in r.stderr
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "status", "--", "x"], capture_output=True,
                       text=True, timeout=CMD_TIMEOUT_S, env=sv.env)
    assert r.returncode == 2 and "unexpected arguments after --" in r.stderr  # other commands refuse them
