// fusekit._C: a Python module with no functions of its own. Importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the CPU/CUDA kernels; the op schemas live in
// python/fusekit/ops/schemas.py (one place, usable without this library).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "fusekit compiled kernels (registered with torch.ops.fusekit)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
