"""Count the vector fused multiply-adds of a built kernel module whose accumulator lives on the
stack (spilled register tiles), from its disassembly (docs/notes/2026-12-03-isa-tiles.md).

An FMA counts as spilled when its accumulator goes through the stack around it: loaded from
the stack at most WINDOW instructions before (or, x86 vfmadd213ps, read as a stack operand) and
stored back to the stack at most WINDOW instructions after (x86-64: vmovaps/vmovups with %rsp or
%rbp; aarch64 with aarch64-linux-gnu-objdump: ldr/str q<n> with [sp]). A tile resuming from saved
sums loads them once before its loop and stores them once after it, far more than WINDOW
instructions from any one FMA, so it does not count; nor does a source operand read from the
stack (a tile's zero-padded block). Prints the totals and the functions with spills;
exits 1 with --max N when more than N FMAs spill.

    python tools/fma_spills.py dyvedeep/_kernels*.so [--objdump aarch64-linux-gnu-objdump] [--max 0]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter

X86_FMA = re.compile(r"\bv(f|fn)m(add|sub)(132|213|231)ps\b.*%([xyz]mm\d+)$")
X86_STACK = re.compile(r"\(%(rsp|rbp)")
X86_STACK_LOAD = re.compile(r"\bvmov(a|u)ps\s+\S*\(%(rsp|rbp)[^)]*\),%[xyz]mm(\d+)$")
X86_STACK_STORE = re.compile(r"\bvmov(a|u)ps\s+%[xyz]mm(\d+),\S*\(%(rsp|rbp)")
ARM_FMLA = re.compile(r"\bfmla\s+v(\d+)\.4s")
ARM_STACK_LOAD = re.compile(r"\bldr\s+q(\d+),\s*\[sp")
ARM_STACK_STORE = re.compile(r"\bstr\s+q(\d+),\s*\[sp")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
WINDOW = 8


def _event(text: str) -> tuple[str, str] | None:
    """("fma", reg), ("fma-stack", reg) (its addend on the stack), ("load", reg), ("store", reg) or None;
    reg is the vector register's number."""
    m = ARM_FMLA.search(text)
    if m:
        return "fma", m.group(1)
    m = X86_FMA.search(text)
    if m:
        reg = re.sub(r"\D", "", m.group(4))
        return ("fma-stack" if m.group(3) == "213" and X86_STACK.search(text) else "fma"), reg
    for pattern, kind, group in ((ARM_STACK_LOAD, "load", 1), (ARM_STACK_STORE, "store", 1),
                                 (X86_STACK_LOAD, "load", 3), (X86_STACK_STORE, "store", 2)):
        m = pattern.search(text)
        if m:
            return kind, m.group(group)
    return None


def count(disassembly: str) -> tuple[int, int, Counter]:
    """(vector FMAs, those on a spilled accumulator, spills per function)."""
    functions: dict[str, list[tuple[str, str] | None]] = {}
    body: list[tuple[str, str] | None] = []
    for line in disassembly.splitlines():
        head = FUNCTION.match(line)
        if head:
            body = functions.setdefault(head.group(1), [])
        elif "\t" in line:
            body.append(_event(line.split("\t", 1)[1].replace("\t", " ").strip()))
    total = spilled = 0
    per_function: Counter = Counter()
    for name, events in functions.items():
        for i, ev in enumerate(events):
            if ev is None or not ev[0].startswith("fma"):
                continue
            total += 1
            reg = ev[1]
            before = events[max(0, i - WINDOW):i]
            after = events[i + 1:i + 1 + WINDOW]
            loaded = ev[0] == "fma-stack" or ("load", reg) in before
            if loaded and ("store", reg) in after:
                spilled += 1
                per_function[name] += 1
    return total, spilled, per_function


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the built extension (dyvedeep/_kernels*.so)")
    parser.add_argument("--objdump", default="objdump", help="objdump of the module's architecture")
    parser.add_argument("--max", type=int, default=None, help="fail when more FMAs than this spill")
    args = parser.parse_args(argv)
    try:
        disassembly = subprocess.run([args.objdump, "-d", "--no-show-raw-insn", args.module], check=True,
                                     capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"fma_spills: cannot disassemble {args.module} with {args.objdump}: {exc}", file=sys.stderr)
        return 2
    total, spilled, per_function = count(disassembly)
    print(f"{args.module}: {total} vector FMAs, {spilled} with a spilled accumulator")
    for function, n in per_function.most_common(10):
        print(f"  {n:5d}  {function}")
    return 1 if args.max is not None and spilled > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
