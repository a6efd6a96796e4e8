// Rank-1 alternating least squares on A = |W| (SVID), each round in a single read of W:
//
//     a = A b            (out,)     a_r = Σ_j |w_rj| b_j
//     z = Aᵀ a           (in,)      z_j = Σ_r |w_rj| a_r
//
// Each thread owns a range of rows. A row is read once from memory for a_r and reused from L1/L2
// for its contribution a_r·|w_r| to the thread's private z; the private z's are summed at the
// end. |W| is never materialised. fp32, bf16 and fp16 weights are read as stored (bf16/fp16 move
// half the bytes) and widened to fp32 in registers; all arithmetic is fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace onebit {
namespace {

#if defined(__AVX512F__)
// 16 consecutive weights (the first `n` of them; the rest read as 0) widened to fp32, made absolute.
inline __m512 abs16(const float* p, __mmask16 m) {
  return _mm512_abs_ps(_mm512_maskz_loadu_ps(m, p));
}
inline __m512 abs16(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
  __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
  return _mm512_abs_ps(_mm512_castsi512_ps(w));
}
inline __m512 abs16(const c10::Half* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
  return _mm512_abs_ps(_mm512_cvtph_ps(h));
}

template <typename T>
void als_rows(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a, float* z) {
  const int64_t full = in / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - full)) - 1u);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = W + r * in;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= full; j += 32) {
      acc0 = _mm512_fmadd_ps(abs16(row + j, 0xFFFF), _mm512_loadu_ps(b + j), acc0);
      acc1 = _mm512_fmadd_ps(abs16(row + j + 16, 0xFFFF), _mm512_loadu_ps(b + j + 16), acc1);
    }
    for (; j < full; j += 16)
      acc0 = _mm512_fmadd_ps(abs16(row + j, 0xFFFF), _mm512_loadu_ps(b + j), acc0);
    if (tail)
      acc1 = _mm512_fmadd_ps(abs16(row + full, tail), _mm512_maskz_loadu_ps(tail, b + full), acc1);
    const float ar = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    a[r] = ar;
    const __m512 av = _mm512_set1_ps(ar);
    for (j = 0; j < full; j += 16)
      _mm512_storeu_ps(z + j, _mm512_fmadd_ps(abs16(row + j, 0xFFFF), av, _mm512_loadu_ps(z + j)));
    if (tail)
      _mm512_mask_storeu_ps(
          z + full, tail,
          _mm512_fmadd_ps(abs16(row + full, tail), av, _mm512_maskz_loadu_ps(tail, z + full)));
  }
}
#else
template <typename T>
void als_rows(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a, float* z) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = W + r * in;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums so the loop vectorises
    int64_t j = 0;
    for (; j + 8 <= in; j += 8)
      for (int k = 0; k < 8; ++k) acc[k] += std::fabs(static_cast<float>(row[j + k])) * b[j + k];
    float ar = 0;
    for (; j < in; ++j) ar += std::fabs(static_cast<float>(row[j])) * b[j];
    for (int k = 0; k < 8; ++k) ar += acc[k];
    a[r] = ar;
    for (j = 0; j < in; ++j) z[j] += std::fabs(static_cast<float>(row[j])) * ar;
  }
}
#endif

// One round on raw pointers: a = A b, z = Aᵀ a. zs is scratch of nt × in floats.
template <typename T>
void als_round(const T* W, int64_t out, int64_t in, const float* b, float* a, float* z, float* zs,
               int64_t nt) {
  std::memset(zs, 0, sizeof(float) * nt * in);
  if (nt == 1) {
    als_rows<T>(W, in, 0, out, b, a, zs);
  } else {
    // One contiguous block of rows per thread: each thread's z stays in its own cache.
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        als_rows<T>(W, in, out * t / nt, out * (t + 1) / nt, b, a, zs + t * in);
    });
  }
  for (int64_t j = 0; j < in; ++j) {
    float s = 0;
    for (int64_t t = 0; t < nt; ++t) s += zs[t * in + j];
    z[j] = s;
  }
}

// The whole rank-1 ALS of onebit.quant.svid._rank1_als in one call (the Python loop costs more
// than the arithmetic on small matrices):
//     a ← max(0, A b)/‖b‖²,  b ← max(0, Aᵀ a)/‖a‖²,  from b = 1,
// until the captured energy ‖a‖²‖b‖² rises by ≤ tol (relative) in a round, or max_iter rounds.
template <typename T>
int64_t rank1_als(const at::Tensor& W, int64_t max_iter, double tol, at::Tensor& a_t,
                  at::Tensor& b_t) {
  const int64_t out = W.size(0), in = W.size(1);
  // Two threads only pay off above ~64k weights (thread wake-up costs microseconds).
  const int64_t nt = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), std::min<int64_t>(out, W.numel() >> 16)));
  std::vector<float> z(in), zs(nt * in);
  const T* Wp = W.const_data_ptr<T>();
  float* a = a_t.mutable_data_ptr<float>();
  float* b = b_t.mutable_data_ptr<float>();
  std::fill(b, b + in, 1.0f);
  double energy = 0;
  int64_t it = 0;
  for (it = 1; it <= max_iter; ++it) {
    als_round<T>(Wp, out, in, b, a, z.data(), zs.data(), nt);
    double bb = 0, aa = 0, bn = 0;
    for (int64_t j = 0; j < in; ++j) bb += double(b[j]) * b[j];
    for (int64_t r = 0; r < out; ++r) {
      a[r] = std::max(0.0f, float(a[r] / bb));
      aa += double(a[r]) * a[r];
    }
    const double scale = (bb * aa) > 0 ? 1.0 / (bb * aa) : 0.0;
    for (int64_t j = 0; j < in; ++j) {
      b[j] = std::max(0.0f, float(z[j] * scale));
      bn += double(b[j]) * b[j];
    }
    const double e = aa * bn;
    if (e > 0 && e - energy <= tol * e) break;
    energy = e;
  }
  return std::min(it, max_iter);
}

std::tuple<at::Tensor, at::Tensor, int64_t> svid_rank1_als(const at::Tensor& W, int64_t max_iter,
                                                          double tol) {
  TORCH_CHECK(W.dim() == 2 && W.device().is_cpu(), "svid_rank1_als: W must be a 2-D CPU tensor");
  TORCH_CHECK(max_iter >= 1, "svid_rank1_als: max_iter must be >= 1");
  const at::Tensor Wc = W.contiguous();
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor a = at::empty({W.size(0)}, opts), b = at::empty({W.size(1)}, opts);
  int64_t rounds = 0;
  switch (W.scalar_type()) {
    case at::kFloat: rounds = rank1_als<float>(Wc, max_iter, tol, a, b); break;
    case at::kBFloat16: rounds = rank1_als<c10::BFloat16>(Wc, max_iter, tol, a, b); break;
    case at::kHalf: rounds = rank1_als<c10::Half>(Wc, max_iter, tol, a, b); break;
    default: TORCH_CHECK(false, "svid_rank1_als: W must be float32, bfloat16 or float16");
  }
  return {a, b, rounds};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(onebit, m) {
  m.def("svid_rank1_als(Tensor W, int max_iter, float tol) -> (Tensor, Tensor, int)");
}
TORCH_LIBRARY_IMPL(onebit, CPU, m) { m.impl("svid_rank1_als", &svid_rank1_als); }

}  // namespace onebit
