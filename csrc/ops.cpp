// The `pdengine` operator library: schemas (a copy of pdengine/ops/_library.py SCHEMAS,
// checked by tests/test_cpp_extension.py), the CPU kernels, and the Python module init.
// CUDA (Triton), fake and autograd registrations are added from Python by the front-ends.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(pdengine, m) {
  m.def(
      "linear_topk_kl(Tensor hidden, Tensor weight, Tensor? lora_a, Tensor? lora_b, "
      "Tensor teacher_ids, Tensor teacher_logprobs, Tensor? labels, float lora_scale, "
      "float temperature, float softcap, bool tail, float ce_weight, int ignore_index) "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_topk_kl_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? lora_a, "
      "Tensor? lora_b, Tensor teacher_ids, Tensor teacher_logprobs, Tensor? labels, Tensor lse, "
      "float lora_scale, float temperature, float softcap, bool tail, float ce_weight, "
      "int ignore_index, bool needs_weight_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_topk_kl_forward_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor? lora_a, Tensor? lora_b, Tensor teacher_ids, Tensor teacher_logprobs, "
      "Tensor? labels, float lora_scale, float temperature, float softcap, bool tail, "
      "float ce_weight, int ignore_index, bool needs_weight_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor? bias, float dropout, int seed) -> Tensor");
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, float scale, float dropout, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "teacher_topk(Tensor hidden, Tensor weight, int k, float temperature, float softcap) "
      "-> (Tensor, Tensor)");
}

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
