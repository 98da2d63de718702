// Module functions written against CPython's METH_FASTCALL convention (positional
// arguments as an array: less parsing than pybind11 on calls made once per unit per
// forward), added to the extension module beside its pybind11 bindings.
#pragma once

#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <initializer_list>

namespace resnet_fused {

// A METH_FASTCALL function as the PyCFunction a PyMethodDef holds.
template <typename F>
PyCFunction fastcall(F* f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

// A float argument (a Python float or anything with __float__); python_error (the Python
// error kept) where it is none.
inline double as_double(PyObject* obj) {
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) {
    throw python_error();
  }
  return value;
}

// A bool argument, by its truth value.
inline bool as_bool(PyObject* obj) {
  const int value = PyObject_IsTrue(obj);
  if (value < 0) {
    throw python_error();
  }
  return value != 0;
}

// torch.nn.Parameter, looked up once when the extension is imported
// (init_parameter_type, from its module init): not at a first call inside a function-local
// static, whose import under the GIL pybind11 warns may deadlock.
inline PyObject*& parameter_type() {
  static PyObject* type = nullptr;
  return type;
}

inline void init_parameter_type() {
  parameter_type() =
      pybind11::object(pybind11::module_::import("torch.nn.parameter").attr("Parameter"))
          .release()
          .ptr();
}

// The tensor arguments args[i], i in `indices` (Tensor or None; the first `required` of
// them must be tensors, `what` names those in the error): a TypeError naming `op` for
// anything else, and whether every one is plain, a Tensor or Parameter with no
// TorchFunctionMode active. Where not, the entry points return NotImplemented and their
// callers take the Python path, which honours __torch_function__.
inline bool plain_tensor_args(PyObject* const* args, std::initializer_list<int> indices,
                              size_t required, const char* op, const char* what) {
  bool plain = !at::impl::torch_function_mode_enabled();
  size_t position = 0;
  for (const int i : indices) {
    PyObject* obj = args[i];
    if (obj == Py_None) {
      TORCH_CHECK_TYPE(position++ >= required, op, ": ", what);
      continue;
    }
    ++position;
    if (THPVariable_CheckExact(obj)) {
      continue;
    }
    TORCH_CHECK_TYPE(THPVariable_Check(obj), op, ": expected a Tensor or None, got ",
                     Py_TYPE(obj)->tp_name);
    plain = plain && reinterpret_cast<PyObject*>(Py_TYPE(obj)) == parameter_type();
  }
  return plain;
}

// Adds the functions of `methods` (ending with a null entry) to module `m`.
inline void add_functions(pybind11::module_& m, PyMethodDef* methods) {
  if (PyModule_AddFunctions(m.ptr(), methods) != 0) {
    throw pybind11::error_already_set();
  }
}

}  // namespace resnet_fused
