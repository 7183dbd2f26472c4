// The one registration point of megarl's C++ ops (`torch.ops.megarl.*`) and the entry point of
// the Python extension `megarl._C`. Each op lives in its own source file; its schema is declared
// here once.
#include <Python.h>
#include <torch/library.h>

#include "copy_plan.h"

namespace megarl {

// Whether the CUDA copy kernels were compiled in (a CUDA toolkit and a CUDA build of torch were
// both present at build time). Tests read it; the copy op itself dispatches on its tensors' device.
bool built_with_cuda() {
#ifdef MEGARL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace megarl

TORCH_LIBRARY(megarl, m) {
  m.def("built_with_cuda() -> bool", &megarl::built_with_cuda);
  // Copies described by `plan` (int64 [num_copies, 9], on the CPU) from `sources` into `out`
  // (flat uint8), converting dtypes; see csrc/copy_plan.h for the plan's columns.
  m.def("execute_copy_plan(Tensor plan, Tensor[] sources, Tensor(a!) out) -> ()");
  m.impl("execute_copy_plan", c10::DispatchKey::CPU, TORCH_FN(megarl::execute_copy_plan_cpu));
#ifdef MEGARL_WITH_CUDA
  m.impl("execute_copy_plan", c10::DispatchKey::CUDA, TORCH_FN(megarl::execute_copy_plan_cuda));
#endif
}

// Importing `megarl._C` loads this shared object, which runs the TORCH_LIBRARY registration
// above. The module itself carries no Python functions.
static struct PyModuleDef megarl_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&megarl_module); }
