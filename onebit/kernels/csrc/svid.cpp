// Rank-1 alternating least squares on A = |W| (SVID), each round in a single read of W:
//
//     a = A b            (out,)     a_r = Σ_j |w_rj| b_j
//     z = Aᵀ a           (in,)      z_j = Σ_r |w_rj| a_r
//
// Each thread owns a range of rows. A row is read once from memory for a_r and reused from L1/L2
// for its contribution a_r·|w_r| to the thread's private z (float32 over 32 rows, then added into
// float64); the private z's are summed at the end. |W| is never materialised. fp32, bf16 and fp16
// weights are read as stored (bf16/fp16 move half the bytes) and widened to fp32 in registers
// (without AVX-512: into a one-row buffer); the arithmetic is fp32 but for those float64 sums.
//
// With AVX-512, rows go in blocks of `block_rows`: z is loaded and stored once per block instead
// of once per row. Within a block, the rows' dot products either run together (`interleave`: 2R
// FMA chains over R row streams) or one row after another (one stream, the block then re-read from
// L1/L2 for the update of z). Every block size and both schedules give the same bits as one row at
// a time. The defaults, from side-by-side runs of benchmarks/bench_svid_kernel.py at the LLaMA-7B
// shapes: bf16/fp16 weights go 8 rows at a time, interleaved (1.1-2.2× faster per round than one
// row at a time in four runs: widening 16-bit weights costs arithmetic, and the blocks save z's
// loads and stores); fp32 weights go 4 rows at a time, one row after another (1.2-1.6× faster
// per round than one row at a time in four side-by-side runs on two threads, 1.2-1.4× on one;
// interleaved fp32 blocks, with R row streams at once, ran at 0.8-1.1× of one row at a time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <tuple>
#include <type_traits>
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

// |w|·b for one row: two FMA chains, then a column tail of in % 16 weights into the second.
template <typename T>
inline float dot_row(const T* row, int64_t in, const float* b) {
  const int64_t full = in / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - full)) - 1u);
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
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// zd[0..16) += v (the first lanes of `m` only), widened to float64.
inline void add_to_f64(double* zd, __m512 v, __mmask16 m) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)));
  const __mmask8 mlo = static_cast<__mmask8>(m & 0xFF), mhi = static_cast<__mmask8>(m >> 8);
  _mm512_mask_storeu_pd(zd, mlo, _mm512_add_pd(_mm512_maskz_loadu_pd(mlo, zd), lo));
  _mm512_mask_storeu_pd(zd + 8, mhi, _mm512_add_pd(_mm512_maskz_loadu_pd(mhi, zd + 8), hi));
}

// R rows at a time. With `Interleave`, their dot products run as 2R independent FMA chains;
// without, one row after another (dot_row). Then the update of z loads and stores each z vector
// once per R rows instead of once per row. Per row, the operations and their order are those of
// dot_row, and the R updates of z are chained in row order, so every R and both schedules give the
// same bits. While z is updated, the next block's rows are prefetched into L2 (when `next` is not
// null). z is the float32 sum of a run of blocks (see als_rows_acc): the run's `first` block starts
// it from zero instead of loading it, and its last block adds it into the float64 `zd` instead of
// storing it (when `zd` is not null); so z is never zeroed or flushed in a pass of its own.
template <typename T, int R, bool Interleave>
inline void als_block(const T* W, int64_t in, int64_t r, const float* b, float* a, float* z,
                      const T* next, bool first, double* zd) {
  const int64_t full = in / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - full)) - 1u);
  const T* row[R];
  for (int k = 0; k < R; ++k) row[k] = W + (r + k) * in;
  __m512 av[R];
  if constexpr (!Interleave || R == 1) {
    for (int k = 0; k < R; ++k) {
      const float ar = dot_row(row[k], in, b);
      a[r + k] = ar;
      av[k] = _mm512_set1_ps(ar);
    }
  } else {
    __m512 acc0[R], acc1[R];
    for (int k = 0; k < R; ++k) acc0[k] = acc1[k] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= full; j += 32) {
      const __m512 b0 = _mm512_loadu_ps(b + j), b1 = _mm512_loadu_ps(b + j + 16);
      for (int k = 0; k < R; ++k) {
        acc0[k] = _mm512_fmadd_ps(abs16(row[k] + j, 0xFFFF), b0, acc0[k]);
        acc1[k] = _mm512_fmadd_ps(abs16(row[k] + j + 16, 0xFFFF), b1, acc1[k]);
      }
    }
    for (; j < full; j += 16) {
      const __m512 b0 = _mm512_loadu_ps(b + j);
      for (int k = 0; k < R; ++k)
        acc0[k] = _mm512_fmadd_ps(abs16(row[k] + j, 0xFFFF), b0, acc0[k]);
    }
    if (tail) {
      const __m512 b0 = _mm512_maskz_loadu_ps(tail, b + full);
      for (int k = 0; k < R; ++k)
        acc1[k] = _mm512_fmadd_ps(abs16(row[k] + full, tail), b0, acc1[k]);
    }
    for (int k = 0; k < R; ++k) {
      const float ar = _mm512_reduce_add_ps(_mm512_add_ps(acc0[k], acc1[k]));
      a[r + k] = ar;
      av[k] = _mm512_set1_ps(ar);
    }
  }
  constexpr int64_t kLine = 64 / sizeof(T);  // weights per cache line; a multiple of 16
  for (int64_t j = 0; j < full; j += 16) {
    __m512 zv = first ? _mm512_setzero_ps() : _mm512_loadu_ps(z + j);
    for (int k = 0; k < R; ++k) zv = _mm512_fmadd_ps(abs16(row[k] + j, 0xFFFF), av[k], zv);
    if (zd != nullptr)
      add_to_f64(zd + j, zv, 0xFFFF);
    else
      _mm512_storeu_ps(z + j, zv);
    if (next != nullptr && j % kLine == 0)
      for (int k = 0; k < R; ++k)
        _mm_prefetch(reinterpret_cast<const char*>(next + k * in + j), _MM_HINT_T1);
  }
  if (tail) {
    __m512 zv = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(tail, z + full);
    for (int k = 0; k < R; ++k) zv = _mm512_fmadd_ps(abs16(row[k] + full, tail), av[k], zv);
    if (zd != nullptr)
      add_to_f64(zd + full, zv, tail);
    else
      _mm512_mask_storeu_ps(z + full, tail, zv);
  }
}

// a_r = |w_r|·b for rows r0..r1-1 (r0 < r1) and zd += Σ_r a_r |w_r|, summed in float32 in z
// (scratch) and added into zd once: blocks of R rows, then single rows. Interleaved blocks prefetch
// the next block while z is updated; row-after-row blocks leave the single stream to the hardware
// prefetcher (with that prefetch, blocks of 8 and 16 rows one by one were 1-33 % slower at the
// three LLaMA-7B shapes, side by side).
template <typename T, int R, bool Interleave>
void als_rows_by(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a,
                 float* z, double* zd) {
  const int64_t blocks_end = r0 + (r1 - r0) / R * R;
  for (int64_t r = r0; r < blocks_end; r += R) {
    const T* next = (Interleave || R == 1) && r + 2 * R <= r1 ? W + (r + R) * in : nullptr;
    als_block<T, R, Interleave>(W, in, r, b, a, z, next, r == r0, r + R == r1 ? zd : nullptr);
  }
  for (int64_t r = blocks_end; r < r1; ++r)
    als_block<T, 1, false>(W, in, r, b, a, z, nullptr, r == r0, r + 1 == r1 ? zd : nullptr);
}

template <typename T, bool Interleave>
void als_rows_sched(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a,
                    float* z, double* zd, int64_t block_rows) {
  switch (block_rows) {
    case 1: als_rows_by<T, 1, false>(W, in, r0, r1, b, a, z, zd); break;
    case 2: als_rows_by<T, 2, Interleave>(W, in, r0, r1, b, a, z, zd); break;
    case 4: als_rows_by<T, 4, Interleave>(W, in, r0, r1, b, a, z, zd); break;
    default: als_rows_by<T, 8, Interleave>(W, in, r0, r1, b, a, z, zd); break;
  }
}

template <typename T>
void als_rows(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a, float* z,
              double* zd, int64_t block_rows, bool interleave) {
  if (interleave)
    als_rows_sched<T, true>(W, in, r0, r1, b, a, z, zd, block_rows);
  else
    als_rows_sched<T, false>(W, in, r0, r1, b, a, z, zd, block_rows);
}
#else
// One row without AVX-512: a_r = |w_r|·b, then z += a_r |w_r|. A single compiled body for every
// weight type (16-bit rows are widened into a float buffer first), so bf16/fp16 weights give the
// bits of the same values in fp32: with a body per type, the compiler contracted the products
// into FMAs differently, and the two differed by an ulp.
__attribute__((noinline)) float als_row(const float* row, int64_t in, const float* b, float* z) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums so the loop vectorises
  int64_t j = 0;
  for (; j + 8 <= in; j += 8)
    for (int k = 0; k < 8; ++k) acc[k] += std::fabs(row[j + k]) * b[j + k];
  float ar = 0;
  for (; j < in; ++j) ar += std::fabs(row[j]) * b[j];
  for (int k = 0; k < 8; ++k) ar += acc[k];
  for (j = 0; j < in; ++j) z[j] += std::fabs(row[j]) * ar;
  return ar;
}

template <typename T>
void als_rows(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a, float* z,
              double* zd, int64_t /*block_rows*/, bool /*interleave: AVX-512 only*/) {
  thread_local std::vector<float> wide;  // one widened row, reused across calls
  std::fill(z, z + in, 0.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = W + r * in;
    if constexpr (std::is_same_v<T, float>) {
      a[r] = als_row(row, in, b, z);
    } else {
      wide.resize(in);
      for (int64_t j = 0; j < in; ++j) wide[j] = static_cast<float>(row[j]);
      a[r] = als_row(wide.data(), in, b, z);
    }
  }
  for (int64_t j = 0; j < in; ++j) zd[j] += z[j];
}
#endif

// Rows r0..r1-1 of one thread: a_r, and z += Σ_r a_r |w_r| in float64. The rows' updates are summed
// in a float32 z (in L1) over kFlushRows rows at a time, and the last block of those rows adds it
// into the float64 z: the float32 sums stay 32 terms long whatever the number of rows, so z is
// exact to about 1e-7 of itself (at 4096 rows per thread, one float32 sum drifted to a few 1e-6
// and left the rank-1 error above scikit-learn's by ~1e-13 relative). Side by side with one
// float32 z, at the LLaMA-7B shapes: fp32 rounds took 0.98-1.02× the time on two threads and
// 1.04-1.10× on one, bf16 rounds (half the bytes per row, so the sums weigh more) 1.03-1.09× and
// 1.02-1.04×.
constexpr int64_t kFlushRows = 32;  // a multiple of every block_rows: blocks never straddle a flush

template <typename T>
void als_rows_acc(const T* W, int64_t in, int64_t r0, int64_t r1, const float* b, float* a,
                  float* z32, double* z, int64_t block_rows, bool interleave) {
  for (int64_t c = r0; c < r1; c += kFlushRows)
    als_rows<T>(W, in, c, std::min(c + kFlushRows, r1), b, a, z32, z, block_rows, interleave);
}

// One round on raw pointers: a = A b, z = Aᵀ a (float64). zs and z32s are scratch of nt × in.
template <typename T>
void als_round(const T* W, int64_t out, int64_t in, const float* b, float* a, double* z, double* zs,
               float* z32s, int64_t nt, int64_t block_rows, bool interleave) {
  std::fill(zs, zs + nt * in, 0.0);
  if (nt == 1) {
    als_rows_acc<T>(W, in, 0, out, b, a, z32s, zs, block_rows, interleave);
  } else {
    // One contiguous block of rows per thread: each thread's z stays in its own cache.
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        als_rows_acc<T>(W, in, out * t / nt, out * (t + 1) / nt, b, a, z32s + t * in,
                        zs + t * in, block_rows, interleave);
    });
  }
  for (int64_t j = 0; j < in; ++j) {
    double s = 0;
    for (int64_t t = 0; t < nt; ++t) s += zs[t * in + j];
    z[j] = s;
  }
}

// ‖x/‖x‖ − y/‖y‖‖ in float64: how far a round moved the direction of b.
double direction_change(const float* x, const float* y, int64_t n) {
  double xx = 0, yy = 0;
  for (int64_t j = 0; j < n; ++j) {
    xx += double(x[j]) * x[j];
    yy += double(y[j]) * y[j];
  }
  if (xx == 0 || yy == 0) return xx == yy ? 0.0 : 2.0;
  const double sx = 1.0 / std::sqrt(xx), sy = 1.0 / std::sqrt(yy);
  double d = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = x[j] * sx - y[j] * sy;
    d += e * e;
  }
  return std::sqrt(d);
}

// The whole rank-1 ALS of onebit.quant.svid._rank1_als in one call (the Python loop costs more
// than the arithmetic on small matrices):
//     a ← max(0, A b)/‖b‖²,  b ← max(0, Aᵀ a)/‖a‖²,  from b = 1,
// until a round moves the unit vector b/‖b‖ by at most tol, or by no less than the round before
// (the float32 floor), or max_iter rounds.
template <typename T>
int64_t rank1_als(const at::Tensor& W, int64_t max_iter, double tol, int64_t block_rows,
                  bool interleave, at::Tensor& a_t, at::Tensor& b_t) {
  const int64_t out = W.size(0), in = W.size(1);
  // Two threads only pay off above ~64k weights (thread wake-up costs microseconds).
  const int64_t nt = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), std::min<int64_t>(out, W.numel() >> 16)));
  std::vector<double> z(in), zs(nt * in);
  std::vector<float> z32s(nt * in), b_prev(in);
  const T* Wp = W.const_data_ptr<T>();
  float* a = a_t.mutable_data_ptr<float>();
  float* b = b_t.mutable_data_ptr<float>();
  std::fill(b, b + in, 1.0f);
  double moved_before = 4.0;  // more than any distance between unit vectors
  int64_t it = 0;
  for (it = 1; it <= max_iter; ++it) {
    als_round<T>(Wp, out, in, b, a, z.data(), zs.data(), z32s.data(), nt, block_rows, interleave);
    std::copy(b, b + in, b_prev.begin());
    double bb = 0, aa = 0;
    for (int64_t j = 0; j < in; ++j) bb += double(b[j]) * b[j];
    for (int64_t r = 0; r < out; ++r) {
      a[r] = std::max(0.0f, float(a[r] / bb));
      aa += double(a[r]) * a[r];
    }
    const double scale = (bb * aa) > 0 ? 1.0 / (bb * aa) : 0.0;
    for (int64_t j = 0; j < in; ++j) b[j] = std::max(0.0f, float(z[j] * scale));
    const double moved = direction_change(b, b_prev.data(), in);
    if (moved <= tol || moved >= moved_before) break;
    moved_before = moved;
  }
  return std::min(it, max_iter);
}

std::tuple<at::Tensor, at::Tensor, int64_t> svid_rank1_als(const at::Tensor& W, int64_t max_iter,
                                                          double tol, int64_t block_rows,
                                                          int64_t interleave) {
  TORCH_CHECK(W.dim() == 2 && W.device().is_cpu(), "svid_rank1_als: W must be a 2-D CPU tensor");
  TORCH_CHECK(max_iter >= 1, "svid_rank1_als: max_iter must be >= 1");
  TORCH_CHECK(block_rows == 0 || block_rows == 1 || block_rows == 2 || block_rows == 4 ||
                  block_rows == 8,
              "svid_rank1_als: block_rows must be 0 (by dtype), 1, 2, 4 or 8, got ", block_rows);
  TORCH_CHECK(interleave == -1 || interleave == 0 || interleave == 1,
              "svid_rank1_als: interleave must be -1 (by dtype), 0 or 1, got ", interleave);
  // The defaults, by dtype (see the top of this file): fp32 4 rows one after another, 16-bit
  // weights 8 rows interleaved.
  const bool wide = W.element_size() == 4;
  if (block_rows == 0) block_rows = wide ? 4 : 8;
  const bool inter = interleave == -1 ? !wide : interleave == 1;
  const at::Tensor Wc = W.contiguous();
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor a = at::empty({W.size(0)}, opts), b = at::empty({W.size(1)}, opts);
  int64_t rounds = 0;
  switch (W.scalar_type()) {
    case at::kFloat: rounds = rank1_als<float>(Wc, max_iter, tol, block_rows, inter, a, b); break;
    case at::kBFloat16:
      rounds = rank1_als<c10::BFloat16>(Wc, max_iter, tol, block_rows, inter, a, b);
      break;
    case at::kHalf:
      rounds = rank1_als<c10::Half>(Wc, max_iter, tol, block_rows, inter, a, b);
      break;
    default: TORCH_CHECK(false, "svid_rank1_als: W must be float32, bfloat16 or float16");
  }
  return {a, b, rounds};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(onebit, m) {
  m.def(
      "svid_rank1_als(Tensor W, int max_iter, float tol, int block_rows=0, int interleave=-1) -> "
      "(Tensor, Tensor, int)");
}
TORCH_LIBRARY_IMPL(onebit, CPU, m) { m.impl("svid_rank1_als", &svid_rank1_als); }

}  // namespace onebit
