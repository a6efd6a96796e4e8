// What packed.cpp shares with decoder.cpp: the decode kernel and the whole packed layer for a few
// tokens, on raw fp32 buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace onebit {

#if defined(__x86_64__) || defined(_M_X64)
// The sum of the 8 lanes of v.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// A packed OneBit layer's parts as fp32 (and int64) buffers; optional parts are nullptr.
//     y = γ ⊙ LN(((x ⊙ g) Sᵀ) ⊙ h) + bias + W_K x
struct PackedView {
  const uint8_t* signs = nullptr;  // (ceil(out / 16), words, 16, 4) tiled bits, see packed.cpp
  int64_t in = 0, out = 0, words = 0;  // words = ceil(in / 32)
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

// The decode kernels' instruction sets, in the order of onebit.kernels.ISAS: portable C++; AVX2
// (with FMA and F16C), without and with the table kernel for one token; AVX-512 (masked adds),
// without and with the table kernel for one token.
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx2Lut = 2, kAvx512 = 3, kAvx512Lut = 4 };

// The instruction set in use.
int64_t current_isa();

// z = x Sᵀ (M, out) for a few tokens x (M, in) fp32, tiles split across threads.
void decode(const float* x, const uint8_t* Q, float* z, int64_t M, int64_t in, int64_t words,
            int64_t out);

// Fails (TORCH_CHECK, naming `what`) unless t is a contiguous-able CPU uint8 tensor of tiled signs
// (onebit.quant.packing.tile_signs) for an out × in matrix.
void check_tiles(const at::Tensor& t, int64_t in, int64_t out, const char* what);

// y (M, out) = the layer L on x (M, in); u: scratch of M * in floats.
void packed_forward(const PackedView& L, const float* x, int64_t M, float* u, float* y);

}  // namespace onebit
