"""Every Triton kernel at the benchmark shapes, compiled offline to sm_90a SASS: registers, spills, shared
memory and SASS instructions per inner-loop step — the kernels' cost read from compiled code, no GPU needed.

    python experiments/sass_report.py [--out experiments/results/sass] [--label current]

Needs ``triton`` (pip's wheel ships ptxas, cuobjdump and nvdisasm) next to jax. For each case the
computation is lowered for ``cuda`` from this machine (:func:`pallas_kernels.lowering.export_for`,
compute capability 9.0); each ``__gpu$xla.gpu.triton`` call in the module carries its Triton IR
(MLIR bytecode, read and printed with jaxlib's Triton dialect), ``num_warps`` and ``num_stages``.
Triton then runs the pipeline XLA runs at compile time — TTIR passes, TTGIR, LLVM IR, PTX, and
ptxas for ``sm_90a`` — and the cubin is read back:

* ``registers``, ``stack``, ``shared`` (bytes, from ``cuobjdump --dump-resource-usage``; Triton's own
  dynamic shared memory, the figure in the table, alongside), ``spill_ops`` (``STL``/``LDL``
  instructions: local-memory traffic is spilling in these kernels, which keep no local arrays);
* loops: each backward branch in the SASS closes a loop; for every loop its static size and its
  opcode mix (``HGMMA``/``HMMA`` tensor-core ops, ``I2F``/``F2F`` conversions, ``LOP3``, global /
  shared loads). ``per_step`` is the instructions one thread issues per iteration of the reduction
  loop (outermost loop): its own body plus each nested loop's body times that loop's trip count
  where the case states it (the sparse-slot chunks of the SL kernels), else once.

Writes ``<out>/<label>.json`` and ``<out>/<label>.md`` (one row per kernel call). Shapes: SL at the
1B MLP (2048 tokens, 2048×5461 and 5461×2048, r = 512, δ = 0.03, bf16); ternary GEMV (1 token)
and GEMM (256 tokens) at 4096×11008, bf16 and int8 activations, and the GEMMs once more with the
shift-and-mask decode that ROCm and the interpreter run instead of the inline PTX; and a plain bf16
Pallas matmul on the SL forward's grid and blocks (:func:`tile_matmul_case`), the tile matmul that the
SL kernels' sparse part is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from _report import markdown_table

from pallas_kernels.lowering import export_for, triton_kernels

HERE = Path(__file__).resolve().parent
ARCH = 90  # Hopper: Triton compiles capability 9.0 for sm_90a
OPS = {
    "mma": re.compile(r"^(HGMMA|IGMMA|HMMA|IMMA|WGMMA)"),
    "cvt": re.compile(r"^(I2F|F2I|F2F|I2FP|F2FP|I2I)"),
    "lop3": re.compile(r"^LOP3"),
    "prmt": re.compile(r"^PRMT"),
    "ldg": re.compile(r"^(LDG|LDGSTS|UTMALDG)"),
    "lds": re.compile(r"^(LDS|LDSM)"),
    "sts": re.compile(r"^STS"),
    "fma": re.compile(r"^(FFMA|FMUL|FADD|HFMA2|HMUL2|HADD2)"),
    "spill": re.compile(r"^(STL|LDL)"),
}


# --- the kernels at the benchmark shapes ------------------------------------------------------------


def sl_case(k: int, n: int, m: int = 2048, rank: int = 512, density: float = 0.03) -> tuple[Callable, list, dict]:
    """Forward + backward of the fused SL matmul (all three kernels) at one 1B MLP shape."""
    from pallas_kernels.platforms import GPU  # lazy: when a kernel is compiled
    from pallas_kernels.sl_matmul.api import sl_matmul  # lazy: when a kernel is compiled
    from pallas_kernels.sl_matmul.blocks import choose_blocks  # lazy: when a kernel is compiled
    from pallas_kernels.sl_matmul.kernel import KernelConfig  # lazy: when a kernel is compiled

    nnz = round(density * k * n)
    args = [
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((k, rank), jnp.float32),
        jax.ShapeDtypeStruct((rank, n), jnp.float32),
        jax.ShapeDtypeStruct((nnz,), jnp.float32),
        jax.ShapeDtypeStruct((nnz,), jnp.int32),
        jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
    ]

    def fwd_bwd(x, a, b, values, idx, dy):
        f = lambda *p: sl_matmul(*p, idx, 8.0 / rank, implementation="pallas")
        y, vjp = jax.vjp(f, x, a, b, values)
        return y, *vjp(dy)

    blk = choose_blocks(GPU, m, k, n, nnz, rank, 2, KernelConfig())
    return fwd_bwd, args, {"inner_trips": blk.chunks, "blocks": blk._asdict()}


def tile_matmul_case(k: int, n: int, m: int = 2048, rank: int = 512, density: float = 0.03):
    """The SL forward's tile matmul alone: a plain bf16 Pallas matmul on the SL forward's grid, blocks,
    warps and stages whose W tiles are loaded from memory instead of built. The SL forward's
    instructions per step beyond this kernel's are what building the sparse tile costs."""
    from jax.experimental import pallas as pl  # lazy: when a kernel is compiled

    from pallas_kernels.platforms import GPU, compiler_params, round_up  # lazy: likewise
    from pallas_kernels.sl_matmul.blocks import choose_blocks  # lazy: likewise
    from pallas_kernels.sl_matmul.kernel import KernelConfig  # lazy: likewise

    blk = choose_blocks(GPU, m, k, n, round(density * k * n), rank, 2, KernelConfig())
    bm, bk, bn = blk.bm, blk.bk, blk.bn
    kp, np_ = round_up(k, bk), round_up(n, bn)

    def kernel(steps_ref, x_ref, w_ref, o_ref):
        def step(t, acc):
            ks = pl.ds(pl.multiple_of(t * bk, bk), bk)
            return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)

        # the trip count read at run time, so that the loop stays a loop (a constant one is unrolled)
        acc = jax.lax.fori_loop(0, steps_ref[0], step, jnp.zeros((bm, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    fn = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, np_), jnp.bfloat16),
        grid=(m // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (0,)),
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=compiler_params(GPU, num_warps=blk.num_warps, num_stages=2),
        name="tile_matmul",
    )
    steps = jnp.full((1,), kp // bk, jnp.int32)
    args = [jax.ShapeDtypeStruct((m, kp), jnp.bfloat16), jax.ShapeDtypeStruct((kp, np_), jnp.bfloat16)]
    return lambda x, w: fn(steps, x, w), args, {"blocks": blk._asdict()}


def ternary_case(
    m: int, k: int = 4096, n: int = 11008, dtype=jnp.bfloat16, ptx: bool = True
) -> tuple[Callable, list, dict]:
    """The packed ternary matmul at ``m`` tokens: bf16 activations, or int8 ones with their per-row scale.

    ``ptx``: the kernel as CUDA runs it (inline-PTX decode); ``False``: the same kernel with the
    shift-and-mask decode every other backend runs, compiled for sm_90a for comparison.
    """
    from pallas_kernels.platforms import GPU  # lazy: when a kernel is compiled
    from pallas_kernels.ternary_matmul import choose_blocks, packed_rows, ternary_matmul  # lazy: likewise
    from pallas_kernels.ternary_matmul.kernel import _pallas_on  # lazy: likewise

    args = [jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((packed_rows(k), n), jnp.uint8)]
    blk = choose_blocks(GPU, m, packed_rows(k), n, jnp.dtype(dtype).itemsize)
    x_scale = jnp.full((m,), 0.01, jnp.float32) if dtype == jnp.int8 else None
    if ptx:
        fn = lambda x, p: ternary_matmul(x, p, 0.02, k=k, x_scale=x_scale, implementation="pallas")
    else:
        rowscale = jnp.full((m,), 0.02, jnp.float32) * (1.0 if x_scale is None else x_scale)
        fn = lambda x, p: _pallas_on(GPU, k, jnp.bfloat16, None, x, p, rowscale)
    return fn, args, {"blocks": blk._asdict()}


CASES: dict[str, Callable[[], tuple[Callable, list, dict]]] = {
    "sl 2048x5461 M=2048": lambda: sl_case(2048, 5461),
    "sl 5461x2048 M=2048": lambda: sl_case(5461, 2048),
    "bf16 tile matmul at the sl blocks, 2048x5461 M=2048": lambda: tile_matmul_case(2048, 5461),
    "ternary gemv 4096x11008 M=1": lambda: ternary_case(1),
    "ternary gemm 4096x11008 M=256": lambda: ternary_case(256),
    "ternary gemv int8 4096x11008 M=1": lambda: ternary_case(1, dtype=jnp.int8),
    "ternary gemm int8 4096x11008 M=256": lambda: ternary_case(256, dtype=jnp.int8),
    "ternary gemm 4096x11008 M=256, shift-and-mask decode": lambda: ternary_case(256, ptx=False),
    "ternary gemm int8 4096x11008 M=256, shift-and-mask decode": lambda: ternary_case(256, dtype=jnp.int8, ptx=False),
}


# --- Triton: TTIR -> cubin for sm_90a ------------------------------------------------------------------


def compile_cubin(call: dict, workdir: Path) -> tuple[bytes, dict]:
    """Compile one call's TTIR as XLA does (TTIR passes first) to a cubin; returns it and Triton's metadata."""
    import triton
    from triton._C.libtriton import ir as tir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": call["num_warps"], "num_stages": call["num_stages"]})
    ctx = tir.context()
    tir.load_dialects(ctx)
    backend.load_dialects(ctx)
    raw = workdir / f"{call['name']}.raw.ttir"
    raw.write_text(call["ttir"])
    module = tir.parse_mlir_module(str(raw), ctx)
    module.context = ctx
    stages: dict[str, Any] = {}
    backend.add_stages(stages, options, triton.compiler.compiler.Language.TRITON)
    ttir = stages["ttir"](module, {})
    path = workdir / f"{call['name']}.ttir"
    path.write_text(str(ttir))
    kernel = triton.compile(str(path), target=target, options=options.__dict__)
    return kernel.asm["cubin"], dict(kernel.metadata._asdict())


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(cubin: Path) -> dict[str, int]:
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.stdout))
    return {key.lower(): int(v) for key, v in found.items()}


def sass(cubin: Path) -> list[tuple[int, str, str]]:
    """``(offset, opcode, text)`` of every SASS instruction of the cubin (its one kernel)."""
    out = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True)
    instrs = []
    for line in out.stdout.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if found:
            instrs.append((int(found.group(1), 16), found.group(3), found.group(3) + found.group(4)))
    return instrs


def loops(instrs: list[tuple[int, str, str]]) -> list[dict]:
    """Loops as ``[start, end]`` instruction index ranges closed by backward branches, outermost first."""
    index = {off: i for i, (off, _, _) in enumerate(instrs)}
    found = []
    for i, (off, op, text) in enumerate(instrs):
        target = re.search(r"0x([0-9a-f]+)", text) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < off and int(target.group(1), 16) in index:  # not the end trap
            found.append((index[int(target.group(1), 16)], i))
    spans = sorted(set(found), key=lambda s: (s[0], -s[1]))
    out = []
    for start, end in spans:
        depth = sum(1 for s, e in spans if s <= start and end <= e and (s, e) != (start, end))
        ops = Counter()
        for _, op, _ in instrs[start : end + 1]:
            for key, pattern in OPS.items():
                ops[key] += bool(pattern.match(op))
        out.append({"start": start, "end": end, "depth": depth, "static": end - start + 1, "ops": dict(ops)})
    return out


def per_step(lps: list[dict], inner_trips: int | None) -> dict | None:
    """Instructions per iteration of the outermost loop of the deepest nest: own body + nested bodies × trips."""
    if not lps:
        return None
    outer = max((lp for lp in lps if lp["depth"] == 0), key=lambda lp: lp["static"])
    inner = [lp for lp in lps if lp["depth"] == 1 and outer["start"] <= lp["start"] and lp["end"] <= outer["end"]]
    trips = inner_trips or 1
    own = outer["static"] - sum(lp["static"] for lp in inner)
    ops = Counter(outer["ops"])
    for lp in inner:
        ops.update({k: v * (trips - 1) for k, v in lp["ops"].items()})
    return {
        "instructions": own + trips * sum(lp["static"] for lp in inner),
        "outer_static": outer["static"],
        "inner_loops": len(inner),
        "inner_static": [lp["static"] for lp in inner],
        "inner_trips": trips if inner else None,
        "ops": dict(ops),
    }


def report_call(call: dict, meta: dict, workdir: Path) -> dict:
    cubin_bytes, tmeta = compile_cubin(call, workdir)
    cubin = workdir / f"{call['name']}.cubin"
    cubin.write_bytes(cubin_bytes)
    instrs = sass(cubin)
    lps = loops(instrs)
    res = resources(cubin)
    total = Counter(op for _, op, _ in instrs)
    return {
        "kernel": call["name"],
        "grid": call["grid"],
        "num_warps": call["num_warps"],
        "num_stages": call["num_stages"],
        "registers": res.get("reg"),
        "stack_bytes": res.get("stack"),
        "local_bytes": res.get("local"),
        "shared_bytes": res.get("shared"),
        "triton_shared_bytes": tmeta.get("shared"),
        "spill_ops": sum(n for op, n in total.items() if OPS["spill"].match(op)),
        "sass_instructions": len(instrs),
        "loops": lps,
        "per_step": per_step(lps, meta.get("inner_trips") if call["name"].startswith("sl_") else None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "sass"))
    p.add_argument("--label", default="current", help="file stem of the report (e.g. before / after)")
    p.add_argument("--cases", nargs="+", default=None, help=f"subset of {list(CASES)}")
    args = p.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("sass_report: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TRITON_CACHE_DIR", str(Path(tmp) / "cache"))
        for case in args.cases or CASES:
            fn, fargs, meta = CASES[case]()
            for call in triton_kernels(export_for(fn, "cuda", *fargs)):
                row = {"case": case, "blocks": meta.get("blocks")} | report_call(call, meta, Path(tmp))
                rows.append(row)
                step = row["per_step"] or {}
                print(
                    f"{case:32s} {row['kernel']:20s} regs {row['registers']} spills {row['spill_ops']}"
                    f" smem {row['triton_shared_bytes']} per-step {step.get('instructions')} {step.get('ops')}",
                    flush=True,
                )
    result = {"label": args.label, "jax_version": jax.__version__, "triton_version": triton.__version__}
    result |= {"git_commit": _commit(), "python": sys.version.split()[0]}
    result |= {"arch": f"sm_{ARCH}a", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.label}.md").write_text(table(result) + "\n")
    print(table(result))
    return 0


def _commit() -> str:
    """The repository's commit, ``-dirty`` when the kernels or this script have uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "pallas_kernels", "experiments/sass_report.py")
    return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")


def table(result: dict) -> str:
    header = (
        "case | kernel | grid | warps | stages | registers | spill ops | shared (B) | SASS instrs"
        " | per step | mma / step | cvt / step | lop3 / step | prmt / step | inner loops × trips"
    )
    cells = []
    for r in result["rows"]:
        s = r["per_step"] or {}
        ops = s.get("ops", {})
        inner = f"{s.get('inner_static')} × {s.get('inner_trips')}" if s.get("inner_loops") else "-"
        cells.append(
            [r["case"], r["kernel"], "×".join(map(str, r["grid"])), r["num_warps"], r["num_stages"], r["registers"]]
            + [r["spill_ops"], r["triton_shared_bytes"], r["sass_instructions"], s.get("instructions", "-")]
            + [ops.get("mma", "-"), ops.get("cvt", "-"), ops.get("lop3", "-"), ops.get("prmt", "-"), inner]
        )
    head = f"SASS of the Triton kernels ({result['label']}): jax {result['jax_version']}"
    head += f", triton {result['triton_version']}"
    commit = result.get("git_commit")
    if commit:
        head += f", commit {commit[:8]}" + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{head}, {result['arch']}.\n\n" + markdown_table(header, cells)


if __name__ == "__main__":
    sys.exit(main())
