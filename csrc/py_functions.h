// Module functions written against CPython's METH_FASTCALL convention (positional
// arguments as an array: less parsing than pybind11 on calls made once per unit per
// forward), added to the extension module beside its pybind11 bindings.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>

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

// Adds the functions of `methods` (ending with a null entry) to module `m`.
inline void add_functions(pybind11::module_& m, PyMethodDef* methods) {
  if (PyModule_AddFunctions(m.ptr(), methods) != 0) {
    throw pybind11::error_already_set();
  }
}

}  // namespace resnet_fused
