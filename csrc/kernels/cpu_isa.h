// What the torch-free CPU kernels of every family share: the storage types of the 16-bit
// dtypes and their conversion to the accumulation type, the 16-lane vector types the kernels
// are written in, and the run-time choice of instruction set.
//
// Each launcher compiles its kernels once per instruction set (entry points carrying
// FUSEKIT_TARGET_AVX512 / FUSEKIT_TARGET_AVX2 / nothing, into which the always-inline kernel
// templates are inlined) and calls the entry that detect_isa() picks, so one wheel runs on any
// x86-64 machine and uses the widest vectors (and the larger register file) it has.
#pragma once

#include <cstdint>
#include <cstring>

namespace fusekit::cpu {

#define FUSEKIT_INLINE inline __attribute__((always_inline))

// ----------------------------------------------------------------------------------------------
// storage types and conversion to the accumulation type
// ----------------------------------------------------------------------------------------------

struct bf16_t { uint16_t bits; };  // same layout as at::BFloat16
struct fp16_t { uint16_t bits; };  // same layout as at::Half

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16_t v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_acc(fp16_t v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}

template <typename T> inline T from_acc(float v);
template <typename T> inline T from_acc(double v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
template <> inline bf16_t from_acc<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
template <> inline fp16_t from_acc<fp16_t>(float v) {
  _Float16 h = static_cast<_Float16>(v);
  fp16_t out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}

// ----------------------------------------------------------------------------------------------
// vector types: kVecLanes lanes of the accumulation type (one AVX-512 register of floats)
// ----------------------------------------------------------------------------------------------

constexpr int kVecLanes = 16;

template <typename A> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(kVecLanes * sizeof(float)))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(kVecLanes * sizeof(double)))); };

// ----------------------------------------------------------------------------------------------
// instruction set, chosen once at run time
// ----------------------------------------------------------------------------------------------

enum class Isa { Avx512, Avx2, Baseline };

inline Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Baseline;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEKIT_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FUSEKIT_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define FUSEKIT_TARGET_AVX512
#define FUSEKIT_TARGET_AVX2
#endif

}  // namespace fusekit::cpu
