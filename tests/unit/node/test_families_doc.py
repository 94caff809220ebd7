"""docs/families.md's table is the code's: every family served (EXACT_FAMILIES), those a real
ring serves in the loopback tests, and every one refused with its reason (REFUSED_FAMILIES),
nothing else. Regenerate it with `python -m tests.unit.node.test_families_doc` after changing
any of them."""

from __future__ import annotations

from pathlib import Path

from tests.loopback.test_families_ring import RINGS
from tests.loopback.test_family_rings import FAMILIES
from zmqinfer.model.facts import ONE_AT_A_TIME
from zmqinfer.node.families import EXACT_FAMILIES, REFUSED_FAMILIES, SOLO_PREFILL

DOC = Path(__file__).resolve().parents[3] / "docs" / "families.md"
BEGIN, END = "<!-- families table: generated -->", "<!-- end of table -->"


def table() -> str:
    killed = {f for f, _ in RINGS}
    ring = {f for f, _ in FAMILIES} | killed
    rows = ["| family | served | real ring | why / how |", "|---|---|---|---|"]
    for f in sorted(EXACT_FAMILIES | set(REFUSED_FAMILIES), key=str.lower):
        if f in EXACT_FAMILIES:
            how = ("exact; one sequence at a time (mlx-lm cannot batch it)" if f in ONE_AT_A_TIME
                   else "exact; first chunks prefilled one at a time, decode batched" if f in SOLO_PREFILL
                   else "exact")
            on_ring = "yes, and kill -9 of a node" if f in killed else "yes" if f in ring else ""
            rows.append(f"| {f} | yes | {on_ring} | {how} |")
        else:
            rows.append(f"| {f} | refused | | {REFUSED_FAMILIES[f].replace('|', '/')} |")
    return "\n".join(rows)


def test_the_doc_table_is_the_code_table() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text
    assert text.split(BEGIN)[1].split(END)[0].strip() == table()


if __name__ == "__main__":
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    DOC.write_text(head + BEGIN + "\n" + table() + "\n" + END + rest.split(END)[1])
