"""`zmqinfer keys init|add NAME|trust FILE|revoke NAME|list`: the cluster directory (keys.py).

    init          make DIR with the gateway's key pair
    add NAME      a key pair for node NAME, trusted at once
    trust FILE    trust a public key made elsewhere (FILE = NAME.key; its stem is the name)
    revoke NAME   stop trusting NAME: running gateways and nodes refuse it within a second
    list          the trusted names and their public keys

DIR is --dir, else $ZMQINFER_KEYS, else ~/.config/zmqinfer/cluster. Secret files are 0600 and
their folder 0700; public keys are not secret.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from zmqinfer.config import NODE_NAME, ConfigError
from zmqinfer.protocol.keys import ENV_DIR, GATEWAY, PRIVATE, PUBLIC

REVOKED = "revoked_keys"  # revoked public keys are moved here, not deleted: what was trusted stays on record


def cluster_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return Path.home() / ".config" / "zmqinfer" / "cluster"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("keys", help="CurveZMQ keys: a key pair per node and for the gateway, and "
                                    "the cluster directory of trusted public keys")
    ksub = k.add_subparsers(required=True, metavar="ACTION")
    for name, fn, text in (("init", cmd_init, "make the cluster directory and the gateway's key pair"),
                           ("list", cmd_list, "list trusted names and public keys")):
        c = ksub.add_parser(name, help=text)
        c.add_argument("--dir", type=Path, default=None, help=f"cluster directory (default ${ENV_DIR} "
                       "or ~/.config/zmqinfer/cluster)")
        c.set_defaults(func=fn)
    for name, fn, text, arg in (("add", cmd_add, "make and trust a key pair for node NAME", "name"),
                                ("revoke", cmd_revoke, "stop trusting NAME (running processes reload)", "name"),
                                ("trust", cmd_trust, "trust the public key FILE (NAME.key)", "file")):
        c = ksub.add_parser(name, help=text)
        c.add_argument(arg, type=Path if arg == "file" else str)
        c.add_argument("--dir", type=Path, default=None, help="cluster directory (see init)")
        c.set_defaults(func=fn)


def make_cluster(directory: Path, names: list[str]) -> None:
    """A cluster directory with the gateway's key pair and one per name (what `up` uses); key
    pairs already there are kept, so `up --keys DIR` can run again on the same directory."""
    _init(directory)
    for n in names:
        if not (directory / PRIVATE / f"{n}.key_secret").exists():
            _add(directory, n)


def _init(directory: Path) -> None:
    for sub, mode in ((PUBLIC, 0o755), (PRIVATE, 0o700)):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(directory / sub, mode)
    if not (directory / PRIVATE / f"{GATEWAY}.key_secret").exists():
        _add(directory, GATEWAY)


def _add(directory: Path, name: str) -> None:
    import zmq.auth

    if not NODE_NAME.fullmatch(name):
        raise ConfigError(f"keys add {name!r}: use letters, digits, '.', '_', '-' (a node id)")
    private = directory / PRIVATE
    if (private / f"{name}.key_secret").exists():
        raise ConfigError(f"{private / name}.key_secret exists: revoke {name!r} first to replace it")
    umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        public_file, secret_file = zmq.auth.create_certificates(private, name)
    finally:
        os.umask(umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    shutil.copy(public_file, directory / PUBLIC / f"{name}.key")


def cmd_init(args: argparse.Namespace) -> int:
    d = cluster_dir(args.dir)
    _init(d)
    print(f"cluster directory {d}: gateway key pair in {d / PRIVATE}, trusted keys in {d / PUBLIC}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    d = cluster_dir(args.dir)
    if not (d / PUBLIC).is_dir():
        raise ConfigError(f"{d}: no cluster directory (run `zmqinfer keys init` first)")
    _add(d, args.name)
    print(f"{args.name}: key pair {d / PRIVATE / args.name}.key_secret, trusted as {d / PUBLIC / args.name}.key")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    from zmq.auth.certs import load_certificate

    d, f = cluster_dir(args.dir), Path(args.file)
    name = f.name.removesuffix(".key_secret").removesuffix(".key")
    if not NODE_NAME.fullmatch(name):
        raise ConfigError(f"{f}: the file's name must be NAME.key, NAME a node id")
    try:
        public, _ = load_certificate(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f}: not a key file ({e})") from None
    (d / PUBLIC).mkdir(parents=True, exist_ok=True)
    target = d / PUBLIC / f"{name}.key"
    # Only the public half is copied, even when handed a secret file.
    target.write_text(f"#   ZeroMQ CURVE Public Certificate for {name}\n\nmetadata\ncurve\n"
                      f"    public-key = \"{public.decode()}\"\n")
    print(f"trusted {name}: {public.decode()}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    d = cluster_dir(args.dir)
    target = d / PUBLIC / f"{args.name}.key"
    if not target.exists():
        raise ConfigError(f"{target}: {args.name!r} is not trusted here")
    (d / REVOKED).mkdir(exist_ok=True)
    target.replace(d / REVOKED / target.name)
    print(f"revoked {args.name}: gateways and nodes reading {d} refuse it within a second; copy this "
          "directory's public_keys/ to the other machines too")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from zmqinfer.protocol.keys import trusted

    d = cluster_dir(args.dir)
    if not (d / PUBLIC).is_dir():
        print(f"zmqinfer: {d}: no cluster directory (run `zmqinfer keys init`)", file=sys.stderr)
        return 1
    for public, name in sorted(trusted(d).items(), key=lambda kv: kv[1]):
        own = " (key pair here)" if (d / PRIVATE / f"{name}.key_secret").exists() else ""
        print(f"{name:24} {public.decode()}{own}")
    return 0
