// What packed.cpp shares with decoder.cpp: the decode kernel and the whole packed layer for a few
// tokens, on raw fp32 buffers.
#pragma once

#include <cstdint>

namespace onebit {

// A packed OneBit layer's parts as fp32 (and int64) buffers; optional parts are nullptr.
//     y = γ ⊙ LN(((x ⊙ g) Sᵀ) ⊙ h) + bias + W_K x
struct PackedView {
  const uint8_t* signs = nullptr;  // (out, nb) bits, see packed.cpp
  int64_t in = 0, out = 0, nb = 0;
  const float* g = nullptr;     // (in,)
  const float* h = nullptr;     // (out,)
  const float* gain = nullptr;  // (out,) or nullptr
  const float* bias = nullptr;  // (out,) or nullptr
  const int64_t* outlier_index = nullptr;  // (k,) flat positions r * in + j
  const float* outlier_value = nullptr;    // (k,)
  int64_t outliers = 0;
  bool output_norm = true;
  double eps = 1e-5;
};

// The decode kernels' instruction set in use: 0 portable C++, 1 AVX2 (with FMA and F16C), 2 AVX-512
// (masked adds), 3 AVX-512 with the table kernel for one token.
int64_t current_isa();

// z = x Sᵀ (M, out) for a few tokens x (M, in) fp32, rows split across threads.
void decode(const float* x, const uint8_t* P, float* z, int64_t M, int64_t in, int64_t nb,
            int64_t out);

// y (M, out) = the layer L on x (M, in); u: scratch of M * in floats.
void packed_forward(const PackedView& L, const float* x, int64_t M, float* u, float* y);

}  // namespace onebit
