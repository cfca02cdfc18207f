// Torch-free description of one KV-cache decoding step (fusekit::mqa_decode), filled by the
// CUDA launcher and read by the kernels of csrc/cuda/mqa_decode_kernels.cu.
//
// q [B, n, Hq, D] (n new tokens per sequence), k_cache / v_cache [B, Lmax, Hkv, D],
// cache_seqlens int32 [B], optional k_new / v_new [B, n, Hkv, D]; out [B, n, Hq, D] (dtype of q)
// and lse [B, n, Hq] (float32, contiguous). Query head h reads KV head h / (Hq / Hkv).
// Every tensor has a unit stride in D; the other strides are arbitrary (element strides).
// (The CPU backend describes the same op with its own MqaDecodeParams in mqa_cpu.h.)
#pragma once
#include <cstdint>

namespace fusekit {

struct MqaDecodeCudaParams {
  const void* q = nullptr;
  void* k_cache = nullptr;                // written in place when k_new is given
  void* v_cache = nullptr;
  const int32_t* cache_seqlens = nullptr; // [B], contiguous
  const void* k_new = nullptr;            // both or neither
  const void* v_new = nullptr;
  void* out = nullptr;
  float* lse = nullptr;                   // [B, n, Hq], contiguous
  // Split workspace (float32, only when num_splits > 1): ws_out [B, n, Hq, num_splits, D] and
  // ws_lse [B, n, Hq, num_splits], both contiguous.
  float* ws_out = nullptr;
  float* ws_lse = nullptr;

  int64_t B = 0, n = 0, Hq = 0, Hkv = 0, D = 0, Lmax = 0;
  // (batch, sequence, head) element strides
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_cache_stride[3] = {0, 0, 0};
  int64_t v_cache_stride[3] = {0, 0, 0};
  int64_t k_new_stride[3] = {0, 0, 0};
  int64_t v_new_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};

  float scale = 1.f;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // < 0: unbounded
  // Number of KV splits: 0 = choose from the shapes (only for mqa_decode_num_splits); the value
  // given to mqa_decode must be the one mqa_decode_num_splits returned.
  int64_t num_splits = 0;
};

}  // namespace fusekit
