"""Compile every Triton kernel of ``megarl.kernels`` for an H100 (sm_90) on any machine.

Triton compiles without a GPU (front end, TTGIR, LLVM, PTX, and a cubin from the ``ptxas`` its
wheel ships), so this catches what the interpreter cannot: code that does not lower for the GPU,
shared memory beyond the SM's, matmuls that miss the tensor cores or the load pipeline. Each
kernel is compiled with its first autotuning configuration, specialised as the launcher sees it at
run time (16-byte aligned pointers, strides and sizes divisible by 16), in bf16. Prints one JSON
object per kernel: name, shared memory bytes, and the counts of ``wgmma`` and ``cp.async``
instructions in its PTX.
"""

from __future__ import annotations

import json
import os

# Compiled kernels, even when the caller runs the kernel tests under the interpreter.
os.environ.pop("TRITON_INTERPRET", None)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from megarl.kernels import fused_linear_logprob_entropy_triton as fused  # noqa: E402
from megarl.kernels import logprob_entropy as logits_op  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
BF16_POINTERS = {"logits_ptr", "grad_logits_ptr", "hidden_ptr", "weight_ptr", "a_ptr", "b_ptr"}
ALIGNED_INTEGERS = {"hidden_size", "n_out", "inner"}


def argument_type(name: str) -> str:
    if name in BF16_POINTERS:
        return "*bf16"
    if name == "targets_ptr":
        return "*i64"
    if name.endswith("_ptr"):
        return "*fp32"
    return "fp32" if name == "inv_temperature" else "i32"


def compile_for_h100(tuned_kernel, **constexprs) -> dict:
    """Compile ``tuned_kernel`` (an autotuner) with its first configuration plus ``constexprs``."""
    config = tuned_kernel.configs[0]
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
        "shared_bytes": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "cp_async": ptx.count("cp.async"),
    }


def main() -> None:
    dot_options = {"UPCAST_DOT": False, "INPUT_PRECISION": "tf32"}
    results = [
        compile_for_h100(logits_op._stats_kernel_tuned),
        compile_for_h100(logits_op._backward_kernel_tuned),
        compile_for_h100(fused._stats_kernel_tuned, GROUP_N=fused.GROUP_ROWS, **dot_options),
        compile_for_h100(fused._grad_logits_kernel_tuned, GROUP_N=fused.GROUP_ROWS, **dot_options),
        compile_for_h100(fused._matmul_accumulate_kernel_tuned, GROUP_M=fused.GROUP_ROWS, **dot_options),
    ]
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
