"""What the gate reads in a kernel's PTX: how wide its global memory accesses are, and
whether its dots became tensor-core instructions."""

from __future__ import annotations

import re

# ld.global[.qualifiers][.vN].{b,f,s,u}BITS, e.g. "ld.global.v4.b32", "st.global.b16",
# "ld.global.L1::evict_last.v2.b32"
_GLOBAL = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+?)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
# cp.async.{ca,cg}.shared.global [dst], [src], BYTES  (asynchronous global -> shared loads;
# BYTES in decimal or hex, e.g. 0x10)
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*"
                       r"\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")


def global_access_bytes(ptx: str) -> dict[str, list[int]]:
    """The distinct widths in bytes of the kernel's global loads (ld.global and cp.async) and
    stores (st.global), e.g. {"load": [4, 16], "store": [16]}."""
    widths: dict[str, set[int]] = {"load": set(), "store": set()}
    for op, vector, bits in _GLOBAL.findall(ptx):
        widths["load" if op == "ld" else "store"].add(int(vector or 1) * int(bits) // 8)
    widths["load"].update(int(n, 0) for n in _CP_ASYNC.findall(ptx))
    return {kind: sorted(sizes) for kind, sizes in widths.items()}


def uses(ptx: str, instruction: str) -> bool:
    """Whether `instruction` (e.g. "wgmma.mma_async") appears as an instruction in the PTX."""
    return re.search(rf"^\s*(?:@!?%\w+\s+)?{re.escape(instruction)}\b", ptx, re.MULTILINE) \
        is not None
