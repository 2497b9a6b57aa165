// The CPU kernels of the `pdengine` operator library, and the Python module init.
// The schemas are defined once, in Python (pdengine/ops/_library.py SCHEMAS); this file only
// registers implementations on those names. The dispatcher checks each kernel's C++
// signature against the schema whichever side loads first (an impl may be registered before
// its definition). CUDA (Triton), fake and autograd registrations come from the front-ends.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY_IMPL(pdengine, CPU, m) {
  m.impl("linear_topk_kl", &pdengine::linear_topk_kl_cpu);
  m.impl("linear_topk_kl_backward", &pdengine::linear_topk_kl_backward_cpu);
  m.impl("linear_topk_kl_forward_backward", &pdengine::linear_topk_kl_forward_backward_cpu);
  m.impl("lora_linear", &pdengine::lora_linear_cpu);
  m.impl("lora_linear_backward", &pdengine::lora_linear_backward_cpu);
  m.impl("teacher_topk", &pdengine::teacher_topk_cpu);
}

// `import pdengine._C` runs the static registrations above; the module itself is empty.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "pdengine C++ CPU kernels (registers torch.ops.pdengine.*)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
