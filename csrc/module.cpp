// The Python module advfast._C. It holds no functions: importing it loads this shared library,
// whose static TORCH_LIBRARY registrations put the ops under torch.ops.advfast. Only setup.py
// compiles this file; the CMake library is loaded with torch.ops.load_library instead.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "advfast compiled ops (torch.ops.advfast)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
