// The geometry values of src/convnet/geometry.py cross into C++ as named structs: these pybind11 casters read
// a Python object's fields BY NAME (ConvGeometry.C, .H, ..., PoolGeometry.window_h, LrnGeometry.a, ...), run the
// C++ validator (conv_geometry / pool_geometry / lrn_geometry, which throw std::invalid_argument -> ValueError),
// and check that C++ derives the same output size as Python (the output-size rule exists once on each side).
// Any object with those attributes converts; a missing attribute raises AttributeError naming it.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "kernels/conv.h"
#include "kernels/lrn.h"
#include "kernels/pool.h"
#include "kernels/rnorm.h"

namespace convnet::bind {

inline int int_field(pybind11::handle obj, const char* name) { return obj.attr(name).cast<int>(); }
inline float float_field(pybind11::handle obj, const char* name) { return obj.attr(name).cast<float>(); }

inline void check_output_size(const char* what, pybind11::handle obj, int oh, int ow) {
  if (int_field(obj, "OH") != oh || int_field(obj, "OW") != ow)
    throw std::invalid_argument(std::string(what) + ": Python and C++ disagree on the output size (" +
                                std::to_string(int_field(obj, "OH")) + "x" + std::to_string(int_field(obj, "OW")) +
                                " vs " + std::to_string(oh) + "x" + std::to_string(ow) + ")");
}

}  // namespace convnet::bind

namespace pybind11::detail {

template <>
struct type_caster<convnet::ConvGeometry> {
  PYBIND11_TYPE_CASTER(convnet::ConvGeometry, const_name("ConvGeometry"));
  bool load(handle src, bool) {
    using convnet::bind::int_field;
    value = convnet::conv_geometry(int_field(src, "C"), int_field(src, "H"), int_field(src, "W"), int_field(src, "N"),
                                   int_field(src, "F"), int_field(src, "KH"), int_field(src, "KW"),
                                   int_field(src, "stride_h"), int_field(src, "stride_w"), int_field(src, "pad_h"),
                                   int_field(src, "pad_w"), int_field(src, "groups"));
    convnet::bind::check_output_size("conv geometry", src, value.OH, value.OW);
    return true;
  }
};

template <>
struct type_caster<convnet::PoolGeometry> {
  PYBIND11_TYPE_CASTER(convnet::PoolGeometry, const_name("PoolGeometry"));
  bool load(handle src, bool) {
    using convnet::bind::int_field;
    value = convnet::pool_geometry(int_field(src, "C"), int_field(src, "H"), int_field(src, "W"), int_field(src, "N"),
                                   int_field(src, "window_h"), int_field(src, "window_w"), int_field(src, "stride_h"),
                                   int_field(src, "stride_w"), int_field(src, "pad_h"), int_field(src, "pad_w"));
    convnet::bind::check_output_size("pool geometry", src, value.OH, value.OW);
    return true;
  }
};

// One launch normalises one group: Python passes LrnGeometry.group() (groups == 1); `a` is alpha with the
// convention resolved.
template <>
struct type_caster<convnet::LrnGeometry> {
  PYBIND11_TYPE_CASTER(convnet::LrnGeometry, const_name("LrnGeometry"));
  bool load(handle src, bool) {
    using convnet::bind::float_field;
    using convnet::bind::int_field;
    if (int_field(src, "groups") != 1)
      throw std::invalid_argument("lrn geometry: one launch normalises one group; pass LrnGeometry.group()");
    value = convnet::lrn_geometry(int_field(src, "C"), int_field(src, "H"), int_field(src, "W"), int_field(src, "N"),
                                  int_field(src, "size"), float_field(src, "a"), float_field(src, "beta"),
                                  float_field(src, "k"));
    return true;
  }
};

// Same-map response / contrast normalisation: `a` is alpha / size^2 (RnormGeometry.a in Python).
template <>
struct type_caster<convnet::RnormGeometry> {
  PYBIND11_TYPE_CASTER(convnet::RnormGeometry, const_name("RnormGeometry"));
  bool load(handle src, bool) {
    using convnet::bind::float_field;
    using convnet::bind::int_field;
    value = convnet::rnorm_geometry(int_field(src, "C"), int_field(src, "H"), int_field(src, "W"),
                                    int_field(src, "N"), int_field(src, "size"), float_field(src, "a"),
                                    float_field(src, "beta"), float_field(src, "k"));
    return true;
  }
};

}  // namespace pybind11::detail
