"""What a zmqinfer service says about itself in its TXT record: `NodeAd`, both ways, validated.

`NodeAd.to_txt()` refuses to send anything malformed; `NodeAd.from_txt()` refuses anything it
did not expect (size-limited, every field checked), raising `AdError` that names the bad key, so
a stranger on the LAN can make a browser skip an ad but never crash it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from zmqinfer.config import NODE_NAME
from zmqinfer.protocol.wire import PROTOCOL_VERSION, NodeId

PROTOCOL = PROTOCOL_VERSION.decode()
Role = Literal["node", "gateway"]
# DNS-SD keeps TXT records under ~1300 bytes so they fit one packet; ours are ~200. Anything
# bigger is not from us, and refusing it bounds what a stranger on the LAN can make us parse.
MAX_TXT_BYTES = 1024
MAX_VALUE_BYTES = 255  # one DNS character-string
# Free memory moves constantly; re-announce only when it moves by this share of the total
# (or anything else changes), so a busy node does not flood the LAN with multicast.
REANNOUNCE_FREE_FRACTION = 0.05
# What each text field of an ad must look like (the numbers are checked by _int).
_TEXT_RULES = {
    "id": (NODE_NAME, "1-63 letters, digits, '.', '_', '-'"),
    "proto": (re.compile(r"[ -~]{1,32}"), "a protocol version"),
    "role": (re.compile(r"node|gateway"), "'node' or 'gateway'"),
    "dev": (re.compile(r"[ -~]{0,128}"), "printable ASCII, at most 128 characters"),
    "fp": (re.compile(r"[0-9a-f]{0,64}"), "lower-case hex"),
    "pk": (re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}"), "a Z85 CurveZMQ key"),
}

# The SRV target label: readable prefix + node id slug + digest. The slug is cut so the label
# stays within DNS's 63 bytes; the digest (of the exact id) keeps ids that slug alike apart.
_SLUG_CHARS = 40
_DIGEST_CHARS = 8  # 32 bits: a clash needs ~65,000 node ids on one LAN


def server_name(node_id: str) -> str:
    """The `.local.` host name whose A records carry this node's addresses: derived from the
    node id alone, so it is unique wherever node ids are (two machines left at one host name
    no longer answer for one name), the same across restarts, and untouched when the machine's
    host name changes while the node runs."""
    slug = re.sub(r"[^a-z0-9-]+", "-", node_id.lower()).strip("-")[:_SLUG_CHARS].strip("-")
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:_DIGEST_CHARS]
    return f"zq-{slug or 'node'}-{digest}.local."


class AdError(ValueError):
    """A TXT record that is not a valid zmqinfer ad; the message says why."""


@dataclass(frozen=True)
class NodeAd:
    """What a node (or the gateway, role="gateway") tells the LAN about itself."""

    node_id: NodeId  # stable across restarts: the node's name in nodes.toml / `--name`
    data_port: int  # a gateway advertises its result port here
    mem_total: int  # bytes
    mem_free: int  # bytes available for weights and KV caches
    device: str  # e.g. "gpu (Darwin arm64, 10 cores)"
    fingerprint: str = ""  # model.resolve.model_fingerprint of the loaded model; "" = none loaded yet
    control_port: int | None = None  # a gateway's control port (nodes have none today)
    pubkey: str | None = None  # CurveZMQ public key (Z85) once encryption lands
    role: Role = "node"
    protocol: str = PROTOCOL

    def to_txt(self) -> dict[str, str]:
        props = {"id": self.node_id, "proto": self.protocol, "role": self.role,
                 "dport": str(self.data_port), "mem": str(self.mem_total),
                 "free": str(self.mem_free), "dev": self.device, "fp": self.fingerprint}
        if self.control_port is not None:
            props["cport"] = str(self.control_port)
        if self.pubkey is not None:
            props["pk"] = self.pubkey
        # Validate what we send with the same rules as what we accept: a bad ad fails here, at
        # the node that made it, not silently at every browser.
        NodeAd.from_txt({k.encode(): v.encode() for k, v in props.items()})
        return props

    @staticmethod
    def from_txt(props: Mapping[bytes, bytes | None]) -> NodeAd:
        """Parse a service's TXT properties; raises AdError naming the first problem.

        Unknown keys are ignored (a newer zmqinfer may add some); the protocol is parsed, not
        checked: whether it is acceptable is the gateway's call (see `refusal`)."""
        size = sum(len(k) + len(v or b"") + 2 for k, v in props.items())
        if size > MAX_TXT_BYTES:
            raise AdError(f"TXT record of {size} bytes exceeds {MAX_TXT_BYTES}")
        txt: dict[str, str] = {}
        for k, v in props.items():
            if v is None or len(v) > MAX_VALUE_BYTES:
                continue
            try:
                txt[k.decode("ascii")] = v.decode("ascii")
            except UnicodeDecodeError:
                raise AdError(f"TXT key {k!r} or its value is not ASCII") from None
        if "id" not in txt or "proto" not in txt:
            raise AdError("not a zmqinfer ad (no id/proto keys)")
        for key, (rule, what) in _TEXT_RULES.items():
            if key in txt and not rule.fullmatch(txt[key]):
                raise AdError(f"{key}={txt[key]!r}: expected {what}")
        mem_total, mem_free = _int(txt, "mem", 0, 1 << 60), _int(txt, "free", 0, 1 << 60)
        if mem_free > mem_total:
            raise AdError(f"free memory {mem_free} exceeds total {mem_total}")
        role: Role = "gateway" if txt.get("role") == "gateway" else "node"
        return NodeAd(node_id=NodeId(txt["id"]), data_port=_int(txt, "dport", 1, 65535),
                      mem_total=mem_total, mem_free=mem_free, device=txt.get("dev", ""),
                      fingerprint=txt.get("fp", ""),
                      control_port=_int(txt, "cport", 1, 65535) if "cport" in txt else None,
                      pubkey=txt.get("pk"), role=role, protocol=txt["proto"])


def _int(txt: dict[str, str], key: str, lo: int, hi: int) -> int:
    value = txt.get(key)
    if value is None or not value.isdigit() or not lo <= int(value) <= hi:
        raise AdError(f"{key}={value!r} is not an integer in [{lo}, {hi}]")
    return int(value)


def worth_reannouncing(old: NodeAd, new: NodeAd) -> bool:
    """Anything but free memory changed, or free memory moved by REANNOUNCE_FREE_FRACTION."""
    if replace(old, mem_free=0) != replace(new, mem_free=0):
        return True
    return abs(old.mem_free - new.mem_free) >= REANNOUNCE_FREE_FRACTION * max(new.mem_total, 1)


def refusal(ad: NodeAd, protocol: str = PROTOCOL, fingerprint: str = "") -> str | None:
    """Why the gateway must not use this node, or None. An empty fingerprint on either side
    means "not known yet" (a node learns its model from its assignment) and is not a refusal."""
    if ad.protocol != protocol:
        return f"speaks protocol {ad.protocol!r}, this gateway speaks {protocol!r}"
    if ad.fingerprint and fingerprint and ad.fingerprint != fingerprint:
        return f"serves model {ad.fingerprint}, this gateway serves {fingerprint}"
    return None
