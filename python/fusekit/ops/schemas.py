"""Every fusekit operator schema, in one place.

The C++ library (fusekit._C) only registers kernels for these schemas
(TORCH_LIBRARY_IMPL(fusekit, CPU|CUDA, m)); Triton kernels are registered from Python as
separate ``*_triton`` ops, so that each op has exactly one kernel per device.

Conventions: padding is explicit as (top, bottom, left, right) so PyTorch's asymmetric
"same" padding for even kernels is representable; backward ops take the forward input
``x`` (its shape and memory format define grad_x) and return fresh tensors.
"""
import torch

lib = torch.library.Library("fusekit", "DEF")

_DEPTHWISE_CONF = "int[2] stride, int[4] padding, int[2] dilation"

for _suffix in ("", "_triton"):
    lib.define(f"depthwise_conv2d{_suffix}(Tensor x, Tensor weight, Tensor? bias, {_DEPTHWISE_CONF}) -> Tensor")
    lib.define(f"depthwise_conv2d_backward_input{_suffix}(Tensor grad_out, Tensor x, Tensor weight, "
               f"{_DEPTHWISE_CONF}) -> Tensor")
    lib.define(f"depthwise_conv2d_backward_weight{_suffix}(Tensor grad_out, Tensor x, int[2] kernel_size, "
               f"{_DEPTHWISE_CONF}) -> (Tensor grad_weight, Tensor grad_bias)")

# InceptionNeXt token mixer: channels (C - 3gc | gc | gc | gc) -> identity | square | 1 x band | band x 1,
# all with "same" padding and stride 1, in one launch.
lib.define("inception_dwconv2d(Tensor x, Tensor w_hw, Tensor? b_hw, Tensor w_w, Tensor? b_w, "
           "Tensor w_h, Tensor? b_h) -> Tensor")
lib.define("inception_dwconv2d_backward(Tensor grad_out, Tensor x, Tensor w_hw, Tensor w_w, Tensor w_h, "
           "bool[2] output_mask) -> (Tensor grad_x, Tensor grad_w_hw, Tensor grad_b_hw, Tensor grad_w_w, "
           "Tensor grad_b_w, Tensor grad_w_h, Tensor grad_b_h)")

# Multi-query / grouped-query attention (DESIGN.md 5.2). Dense: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D].
# Packed variable-length batches: q [Tq, Hq, D], k/v [Tk, Hkv, D] with int32 cu_seqlens_q/k [B + 1]
# (both or neither) and max_seqlen_q/k bounding every sequence (they size the launch grid, so no host
# synchronization is needed). lse is the natural-log sum of exp of the scaled logits, float32
# (float64 for float64 inputs), shaped q.shape[:-1]. window_left/right < 0 means unbounded.
_MQA_CONF = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
             "bool causal, int window_left, int window_right")
for _suffix in ("", "_triton"):
    lib.define(f"mqa_forward{_suffix}(Tensor q, Tensor k, Tensor v, {_MQA_CONF}) -> (Tensor out, Tensor lse)")
    lib.define(f"mqa_backward{_suffix}(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
               f"{_MQA_CONF}) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)")
    # KV-cache decoding: q [B, n, Hq, D] against caches [B, Lmax, Hkv, D] holding cache_seqlens[b] tokens;
    # k_new/v_new [B, n, Hkv, D] are written into the caches at cache_seqlens[b] first (declared mutation).
    # num_splits = 0 picks the KV split from the shapes alone, so launches are fixed for a cache size.
    lib.define(f"mqa_decode{_suffix}(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
               f"Tensor? k_new, Tensor? v_new, float scale, bool causal, int window_left, int window_right, "
               f"int num_splits) -> (Tensor out, Tensor lse)")

# Neighborhood attention (DESIGN.md 5.1), rank R = len(kernel_size) in 1..3. Heads-last:
# q [B, *spatial(R), Hq, D], k/v [B, *spatial, Hkv, D]; rpb [Hq, 2k_0-1, .., 2k_{R-1}-1] or None
# (added to the scaled logits; non-causal only). lse [B, *spatial, Hq] is float32 (float64 for
# float64 inputs). Backward ops return grad_rpb as an empty tensor when rpb is None.
# Unfused ops: attn [B, Hq, *spatial, prod(kernel_size)], one slot per neighbour in row-major
# order over the per-axis window offsets; slots a causal window does not reach are -inf in na_qk,
# ignored by na_av and 0 in grad_attn.
_NA_CONF = "int[] kernel_size, int[] stride, int[] dilation, bool[] is_causal"
for _suffix in ("", "_triton"):
    lib.define(f"na_forward{_suffix}(Tensor q, Tensor k, Tensor v, Tensor? rpb, {_NA_CONF}, float scale) "
               "-> (Tensor out, Tensor lse)")
    lib.define(f"na_backward{_suffix}(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
               f"Tensor? rpb, {_NA_CONF}, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
               "Tensor grad_rpb)")
    lib.define(f"na_qk{_suffix}(Tensor q, Tensor k, Tensor? rpb, {_NA_CONF}, float scale) -> Tensor")
    lib.define(f"na_qk_backward{_suffix}(Tensor grad_attn, Tensor q, Tensor k, bool has_rpb, {_NA_CONF}, "
               "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_rpb)")
    lib.define(f"na_av{_suffix}(Tensor attn, Tensor v, {_NA_CONF}) -> Tensor")
    lib.define(f"na_av_backward{_suffix}(Tensor grad_out, Tensor attn, Tensor v, {_NA_CONF}) "
               "-> (Tensor grad_attn, Tensor grad_v)")

# Fused inverted-residual blocks (DESIGN.md 5.4), inference kernels on BN-folded weights; x [N, Cin, H, W]
# (NCHW or channels_last; the output follows x's layout). activation: 0 identity, 1 relu, 2 relu6,
# 3 silu, 4 hardswish, applied after the expand and after the depthwise stage.
#   inverted_residual_forward: a1 = act(x W_e^T + b_e) (a1 = x when w_expand is None), d = dw(a1) + b_dw,
#     a2 = act(d) * gate[n, e] (gate [N, E] or None), y = a2 W_p^T + b_p (+ x when residual);
#     w_expand [E, Cin], w_dw [E, kh, kw], w_project [Cout, E]. The expanded tensor is never written.
#   inverted_residual_dw_sums: per sample and expanded channel, sums over output pixels of d, d*d and
#     act(d): [N, 3, E] float32 (float64 for float64 x). Batch statistics and squeeze-excitation pooling.
#   fused_mbconv_forward: a1 = act(conv_kxk(x, w_expand) + b_e) (w_expand [E, Cin, kh, kw]),
#     y = a1 W_p^T + b_p (y = a1 when w_project is None) (+ x when residual).
_IR_CONF = "int[2] stride, int[4] padding, int[2] dilation, int activation"
for _suffix in ("", "_triton"):
    lib.define(f"inverted_residual_forward{_suffix}(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, "
               f"Tensor? b_dw, Tensor w_project, Tensor? b_project, Tensor? gate, {_IR_CONF}, bool residual) "
               "-> Tensor")
    lib.define(f"inverted_residual_dw_sums{_suffix}(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, "
               f"Tensor? b_dw, {_IR_CONF}) -> Tensor")
    lib.define(f"fused_mbconv_forward{_suffix}(Tensor x, Tensor w_expand, Tensor? b_expand, Tensor? w_project, "
               f"Tensor? b_project, {_IR_CONF}, bool residual) -> Tensor")
