"""Compile every Triton kernel of ``megarl.kernels`` for an H100 (sm_90) on any machine.

Triton compiles without a GPU (front end, TTGIR, LLVM, PTX, and a cubin from the ``ptxas`` its
wheel ships), so this catches what the interpreter cannot: code that does not lower for the GPU,
shared memory beyond the SM's, matmuls that miss the tensor cores or the load pipeline. Each
kernel is compiled, specialised as the launcher sees it at run time (16-byte aligned pointers,
strides and sizes divisible by 16), in bf16, with the first autotuning configuration of each of
its variants (``USE_TMA``: operands through TMA descriptors; ``PERSISTENT``: one program per SM
looping over tiles), or with every configuration (``--all-configs``). Prints one JSON object per
compilation: kernel, configuration, shared memory bytes, the counts of ``wgmma``, ``cp.async``
and TMA (``cp.async.bulk.tensor``) instructions in its PTX, and what ``ptxas -v`` (the one Triton
compiles sm_90 with, from its wheel) reports: registers per thread and bytes of register spills (stores, loads).

    python tests/kernels/compile_for_h100.py [--all-configs] [--no-registers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

# Compiled kernels, even when the caller runs the kernel tests under the interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from megarl.kernels import fused_linear_logprob_entropy_triton as fused  # noqa: E402
from megarl.kernels import logprob_entropy as logits_op  # noqa: E402
from megarl.kernels import matmul_accumulate  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
BF16_POINTERS = {"logits_ptr", "grad_logits_ptr", "hidden_ptr", "weight_ptr", "a_ptr", "b_ptr"}
ALIGNED_INTEGERS = {"hidden_size", "n_out", "inner"}


def argument_type(name: str) -> str:
    if name in BF16_POINTERS:
        return "*bf16"
    if name == "targets_ptr":
        return "*i32"
    if name.endswith("_ptr"):
        return "*fp32"
    return "fp32" if name == "inv_temperature" else "i32"


def ptxas_report(ptx: str) -> dict:
    """``{"registers", "spill_stores", "spill_loads"}`` from ``ptxas -v`` on ``ptx`` (sm_90a)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(H100.arch).path, "-arch=sm_90a", "-v", str(source), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    report = result.stdout + result.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
    }


def compile_config(tuned_kernel, config: triton.Config, registers: bool = True, **constexprs) -> dict:
    """Compile ``tuned_kernel`` (an autotuner) with ``config`` plus ``constexprs``; ``registers``:
    also run ``ptxas -v`` for the register and spill counts (seconds per kernel)."""
    kernel = tuned_kernel.fn
    while not isinstance(kernel, JITFunction):  # through the heuristics wrapper
        kernel = kernel.fn
    constexprs = {**config.kwargs, **constexprs}
    if "EVEN_K" in kernel.arg_names:
        constexprs["EVEN_K"] = True
    signature = {
        name: "constexpr" if param.is_constexpr else argument_type(name)
        for name, param in zip(kernel.arg_names, kernel.params)
    }
    aligned = [
        (index,) for index, name in enumerate(kernel.arg_names)
        if signature[name].startswith("*") or name.endswith("stride") or name in ALIGNED_INTEGERS
    ]
    compiled = compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                  attrs={index: [["tt.divisibility", 16]] for index in aligned}),
        target=H100,
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.__name__,
        "module": kernel.fn.__module__,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "shared_bytes": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "cp_async": ptx.count("cp.async") - ptx.count("cp.async.bulk"),
        "tma": ptx.count("cp.async.bulk.tensor"),
        **(ptxas_report(ptx) if registers else {}),
        "triton": triton.__version__,
    }


def variant_configs(tuned_kernel, all_configs: bool) -> list[triton.Config]:
    """Every configuration, or the first of each variant (its ``USE_TMA`` and ``PERSISTENT``)."""
    if all_configs:
        return list(tuned_kernel.configs)
    firsts = {}
    for config in tuned_kernel.configs:
        firsts.setdefault((config.kwargs.get("USE_TMA"), config.kwargs.get("PERSISTENT")), config)
    return list(firsts.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all-configs", action="store_true", help="every autotuning configuration")
    parser.add_argument("--no-registers", action="store_true", help="skip ptxas -v (registers, spills)")
    args = parser.parse_args(argv)
    dot_options = {"UPCAST_DOT": False, "INPUT_PRECISION": "tf32"}
    kernels = [
        (logits_op._stats_kernel_tuned, {}),
        (logits_op._backward_kernel_tuned, {}),
        (fused._stats_kernel_tuned, {"GROUP_N": fused.GROUP_ROWS, **dot_options}),
        (fused._grad_logits_kernel_tuned, {"GROUP_N": fused.GROUP_ROWS, **dot_options}),
        (matmul_accumulate._matmul_accumulate_kernel_tuned, {"GROUP_M": fused.GROUP_ROWS, **dot_options}),
    ]
    for tuned_kernel, constexprs in kernels:
        for config in variant_configs(tuned_kernel, args.all_configs):
            start = time.perf_counter()
            result = compile_config(tuned_kernel, config, not args.no_registers, **constexprs)
            print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main()
