// The key of a module's cached eval fold (W', b' of a Conv+BN pair, resnet_fused/modules.py
// FoldCache), checked at every eval call of a fused unit: are the fold's six inputs the
// same tensors as when it was made, unchanged?
//
//   fold_key(*tensors) -> key or None         (a capsule; tensors: Tensor or None each)
//   fold_key_check(key, contents, *tensors) -> int | None
//
// fold_key_check returns None when any input differs from the key's: another tensor object
// (or None where one was, or the reverse), another storage or data pointer, a version
// counter moved on (an in-place write, an optimizer step, load_state_dict), another dtype,
// shape, stride or device. Otherwise it returns the inputs' fingerprint now (their bytes'
// hash, cpu/fingerprint.cpp; the caller compares it with the one the fold was made for,
// which sees writes through `.data` or numpy that bump no counter), or 0 when `contents`
// is false (RESNET_FUSED_FOLD_CHECK=versions).
//
// Why C++: the same check in Python (a loop over six tensors reading `_version` and
// `data_ptr()`, then the fingerprint op through the dispatcher) cost ~4 us per unit call,
// a fifth of a tiny eval unit's whole host time; this costs well under 1 us.
//
// Identity: the key holds each tensor's TensorImpl address (no reference of any kind: the
// tensor is not kept alive, and torch.utils.swap_tensors, which `.to()` and
// load_state_dict use under torch.__future__.set_swap_module_params_on_conversion,
// refuses tensors with weak references) and its storage strongly (its address cannot be
// reused while the key lives, so a data pointer compared equal is the same memory) and its
// version counter strongly (compared by identity: a tensor that took a freed one's
// address and views the same memory, say a Parameter made of `w.data`, has a counter of
// its own, whose count may well reach the keyed one; RESNET_FUSED_FOLD_CHECK=versions
// trusts the counters, so such a tensor must not pass). A Python tensor object and its
// TensorImpl are one to one. The keyed tensors are plain strided CPU tensors, never
// inference tensors (no version counter) or tensor subclasses that dispatch to Python (a
// wrapper's storage holds no data): for those fold_key returns None and the caller keeps
// no fold. A tensor passed to the check
// that is another object fails the identity test before its version counter is read.
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "py_functions.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace resnet_fused {

// The fingerprint of the CPU tensors' bytes, in order (cpu/fingerprint.cpp).
int64_t fingerprint_tensors(at::TensorList tensors);

namespace {

constexpr const char* kCapsuleName = "resnet_fused.FoldKey";

// The identity of a version counter (shared by a tensor's views and detach()es, new for
// `.data` and other fresh tensors): the address of its shared state. VariableVersion
// holds that state's intrusive pointer as its only member and does not expose it.
// (Another layout in some other torch: no identity, so versions-only checks trust the
// count alone there; the default check still compares the contents.)
inline const void* counter_identity(const c10::VariableVersion& v) {
  if constexpr (sizeof(c10::VariableVersion) == sizeof(void*) &&
                std::is_standard_layout_v<c10::VariableVersion>) {
    const void* p = nullptr;
    std::memcpy(&p, &v, sizeof(p));
    return p;
  } else {
    return nullptr;
  }
}

struct Held {
  bool present = false;
  const c10::TensorImpl* impl = nullptr;  // (an address, never dereferenced)
  c10::VariableVersion counter;           // (held: its address is not reused)
  c10::Storage storage;
  const void* ptr = nullptr;
  uint32_t version = 0;
  at::ScalarType dtype = at::ScalarType::Undefined;
  c10::Device device{c10::kCPU};
  std::vector<int64_t> sizes, strides;
};

struct FoldKey {
  std::vector<Held> held;
  int64_t present_bytes = 0;
};

void destroy(PyObject* capsule) {
  delete static_cast<FoldKey*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

const at::Tensor* tensor_or_none(PyObject* obj, const char* what) {
  if (obj == Py_None) {
    return nullptr;
  }
  TORCH_CHECK_TYPE(THPVariable_Check(obj), what, ": expected a Tensor or None, got ",
                   Py_TYPE(obj)->tp_name);
  return &THPVariable_Unpack(obj);
}

PyObject* fold_key(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  auto key = std::make_unique<FoldKey>();
  key->held.resize(nargs);
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    const at::Tensor* t = tensor_or_none(args[i], "fold_key");
    if (t == nullptr) {
      continue;
    }
    if (t->layout() != at::kStrided || !t->has_storage() || t->is_inference() ||
        !t->device().is_cpu() ||
        t->key_set().has_any(c10::DispatchKeySet(c10::DispatchKey::Python)) ||
        (t->storage().data() == nullptr && t->storage().nbytes() > 0)) {
      Py_RETURN_NONE;  // (no key: the caller keeps no fold)
    }
    Held& h = key->held[i];
    h.present = true;
    h.impl = t->unsafeGetTensorImpl();
    h.counter = h.impl->version_counter();
    h.storage = t->storage();
    h.ptr = t->const_data_ptr();
    h.version = t->_version();
    h.dtype = t->scalar_type();
    h.device = t->device();
    h.sizes = t->sizes().vec();
    h.strides = t->strides().vec();
    key->present_bytes += static_cast<int64_t>(t->nbytes());
  }
  PyObject* capsule = PyCapsule_New(key.get(), kCapsuleName, &destroy);
  if (capsule == nullptr) {
    return nullptr;
  }
  key.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

bool same(const Held& h, const at::Tensor* t) {
  if (t == nullptr) {
    return !h.present;
  }
  if (!h.present) {
    return false;
  }
  c10::TensorImpl* impl = t->unsafeGetTensorImpl();
  // Identity first: only the key's own tensors (never inference tensors) reach _version().
  return h.impl == impl &&
         counter_identity(impl->version_counter()) == counter_identity(h.counter) &&
         impl->has_storage() &&
         impl->storage().unsafeGetStorageImpl() == h.storage.unsafeGetStorageImpl() &&
         t->const_data_ptr() == h.ptr && t->_version() == h.version &&
         t->scalar_type() == h.dtype && t->device() == h.device && t->sizes() == h.sizes &&
         t->strides() == h.strides;
}

PyObject* fold_key_check(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs >= 2, "fold_key_check(key, contents, *tensors)");
  auto* key = static_cast<FoldKey*>(PyCapsule_GetPointer(args[0], kCapsuleName));
  if (key == nullptr) {
    return nullptr;  // (PyCapsule_GetPointer set the TypeError/ValueError)
  }
  const int contents = PyObject_IsTrue(args[1]);
  if (contents < 0) {
    return nullptr;
  }
  const Py_ssize_t n = nargs - 2;
  if (n != static_cast<Py_ssize_t>(key->held.size())) {
    Py_RETURN_NONE;
  }
  c10::SmallVector<at::Tensor, 8> present;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = tensor_or_none(args[i + 2], "fold_key_check");
    if (!same(key->held[i], t)) {
      Py_RETURN_NONE;
    }
    if (t != nullptr) {
      present.push_back(*t);
    }
  }
  if (!contents) {
    return PyLong_FromLongLong(0);
  }
  int64_t fingerprint = 0;
  if (key->present_bytes >= (256 << 10)) {  // (a read of this size: let other threads run)
    pybind11::gil_scoped_release no_gil;
    fingerprint = fingerprint_tensors(present);
  } else {
    fingerprint = fingerprint_tensors(present);
  }
  return PyLong_FromLongLong(fingerprint);
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"fold_key", fastcall(&fold_key), METH_FASTCALL,
     "fold_key(*tensors): the key of a cached fold of these tensors (Tensor or None each), "
     "or None where one cannot be keyed (not a plain strided CPU tensor with its data)."},
    {"fold_key_check", fastcall(&fold_key_check), METH_FASTCALL,
     "fold_key_check(key, contents, *tensors): None when the tensors are not the key's "
     "(object, storage, data pointer, version counter, dtype, shape, strides, device); else "
     "their fingerprint now, or 0 when contents is false."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

void bind_fold_key(pybind11::module_& m) {
  add_functions(m, kMethods);
}

}  // namespace resnet_fused
