// The sparse engine's CPU kernels, all over row-major [tokens, features] activations, summing in float32:
//
// sampled_dot: the value gradient in one pass over grad_out and x (below);
// spmm / spmm_t: the unmerged delta's product S x and its transpose S^T g (after it).
//
// sampled_dot:
//
//     out[k] = sum_t g[t, r_k] * x[t, c_k],   (r_k, c_k) = divmod(indices[k], in)
//
// Tokens go in tiles of SAMPLED_TILE. Each tile's needed rows of g and columns of x are transposed into
// small token-contiguous buffers (they stay in cache), then every index takes a dot product of
// length SAMPLED_TILE. torch's route (a transposing copy of all of g and x to memory, then
// sparse.sampled_addmm) moves about 3x the bytes. Threads split the tiles; each keeps its own sums.
#include <torch/extension.h>

#include <algorithm>
#include <thread>
#include <vector>

namespace {

// Tokens per tile. spmm / spmm_t: 32 (measured: 32 beat 64 and 128, and built with AVX-512 32 and 64 tie). sampled_dot:
// 128, built with AVX-512 (measured in one process, 1,000 tokens, LoRA r=8's count: 1.4-1.6x faster than 32, whose
// one horizontal sum per value and tile then dominates; 256 no better); its buffers then take about 1 MB per
// thread for a 576 x 1536 layer. Also measured and not kept: 16 x 16 register transposes (AVX-512 permutes) of the
// tiles, no faster (the products' scattered loads from the buffers dominate, not the transposes), and a fused
// backward pass (S^T g and the value gradient sharing g's transposed tiles), no faster either.
constexpr int64_t TILE = 32;
constexpr int64_t SAMPLED_TILE = 128;
constexpr int64_t BLOCK = 8;  // tokens read together while transposing
constexpr int64_t ACCUMULATORS = 4;  // spmm_add's independent partial sums per row (the sum below adds 4)
constexpr int64_t FEATURE_BLOCK = 16;  // output features written together when transposing back

template <typename G, typename X>
void run_tiles(const G* g, const X* x, int64_t O, int64_t I, int64_t T, const int64_t* urows, int64_t nr,
               const int64_t* ucols, int64_t nc, const int32_t* lrow, const int32_t* lcol, int64_t m,
               int64_t tile_begin, int64_t tile_end, float* acc) {
  std::vector<float> gt(nr * SAMPLED_TILE), xt(nc * SAMPLED_TILE);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * SAMPLED_TILE, n = std::min(SAMPLED_TILE, T - t0);
    if (n < SAMPLED_TILE) {
      std::fill(gt.begin(), gt.end(), 0.f);
      std::fill(xt.begin(), xt.end(), 0.f);
    }
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
      const int64_t nj = std::min(BLOCK, n - j0);
      for (int64_t r = 0; r < nr; ++r) {
        float* d = gt.data() + r * SAMPLED_TILE + j0;
        const G* s = g + (t0 + j0) * O + urows[r];
        for (int64_t j = 0; j < nj; ++j) d[j] = static_cast<float>(s[j * O]);
      }
      for (int64_t c = 0; c < nc; ++c) {
        float* d = xt.data() + c * SAMPLED_TILE + j0;
        const X* s = x + (t0 + j0) * I + ucols[c];
        for (int64_t j = 0; j < nj; ++j) d[j] = static_cast<float>(s[j * I]);
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      const float* a = gt.data() + lrow[k] * SAMPLED_TILE;
      const float* b = xt.data() + lcol[k] * SAMPLED_TILE;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < SAMPLED_TILE; ++j) s += a[j] * b[j];
      acc[k] += s;
    }
  }
}

template <typename G, typename X>
torch::Tensor dispatch(const torch::Tensor& g, const torch::Tensor& x, const std::vector<int32_t>& lrow,
                       const std::vector<int32_t>& lcol, const std::vector<int64_t>& urows,
                       const std::vector<int64_t>& ucols, int64_t threads) {
  const int64_t T = g.size(0), O = g.size(1), I = x.size(1), m = static_cast<int64_t>(lrow.size());
  const int64_t tiles = (T + SAMPLED_TILE - 1) / SAMPLED_TILE;
  threads = std::max<int64_t>(1, std::min(threads, tiles));
  auto partial = torch::zeros({threads, m}, g.options().dtype(torch::kFloat32));
  const G* gp = reinterpret_cast<const G*>(g.data_ptr());
  const X* xp = reinterpret_cast<const X*>(x.data_ptr());
  const int64_t *ur = urows.data(), *uc = ucols.data();
  float* pp = partial.data_ptr<float>();
  const int64_t nr = static_cast<int64_t>(urows.size()), nc = static_cast<int64_t>(ucols.size());
  auto work = [&](int64_t w) {
    run_tiles<G, X>(gp, xp, O, I, T, ur, nr, uc, nc, lrow.data(), lcol.data(), m, tiles * w / threads,
                    tiles * (w + 1) / threads, pp + w * m);
  };
  {
    pybind11::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (int64_t w = 1; w < threads; ++w) pool.emplace_back(work, w);
    work(0);
    for (auto& t : pool) t.join();
  }
  return threads == 1 ? partial[0] : partial.sum(0);
}

// Each index's row and column, as positions among the rows and columns in use (which are listed).
template <typename Index>
void positions(const torch::Tensor& indices, int64_t O, int64_t I, std::vector<int32_t>& lrow,
               std::vector<int32_t>& lcol, std::vector<int64_t>& urows, std::vector<int64_t>& ucols) {
  const Index* idx = indices.data_ptr<Index>();
  std::vector<int32_t> row_pos(O, -1), col_pos(I, -1);
  for (size_t k = 0; k < lrow.size(); ++k) {
    const int64_t flat = static_cast<int64_t>(idx[k]), r = flat / I, c = flat % I;
    TORCH_CHECK(flat >= 0 && r < O, "sampled_dot: index ", flat, " outside the [", O, " x ", I, "] weight");
    if (row_pos[r] < 0) { row_pos[r] = static_cast<int32_t>(urows.size()); urows.push_back(r); }
    if (col_pos[c] < 0) { col_pos[c] = static_cast<int32_t>(ucols.size()); ucols.push_back(c); }
    lrow[k] = row_pos[r];
    lcol[k] = col_pos[c];
  }
}

}  // namespace

// g: [T, out] and x: [T, in], contiguous, float32 or bfloat16; indices: the m flat positions into the
// [out, in] weight (int32 or int64). Returns the m sums in float32. Extra memory, all freed on return:
// O(threads * (m + SAMPLED_TILE * (out + in))).
torch::Tensor sampled_dot(torch::Tensor g, torch::Tensor x, torch::Tensor indices, int64_t threads) {
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0), "sampled_dot: g [T, out] and x [T, in]");
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && indices.is_contiguous(), "sampled_dot: contiguous inputs");
  TORCH_CHECK(g.device().is_cpu() && x.device().is_cpu() && indices.device().is_cpu(), "sampled_dot: CPU only");
  const bool g16 = g.scalar_type() == torch::kBFloat16, x16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((g16 || g.scalar_type() == torch::kFloat32) && (x16 || x.scalar_type() == torch::kFloat32),
              "sampled_dot: float32 or bfloat16 only");
  const int64_t m = indices.numel(), O = g.size(1), I = x.size(1);
  std::vector<int32_t> lrow(m), lcol(m);
  std::vector<int64_t> urows, ucols;
  if (indices.scalar_type() == torch::kInt32) positions<int32_t>(indices, O, I, lrow, lcol, urows, ucols);
  else if (indices.scalar_type() == torch::kInt64) positions<int64_t>(indices, O, I, lrow, lcol, urows, ucols);
  else TORCH_CHECK(false, "sampled_dot: int32 or int64 indices");
  if (g16 && x16) return dispatch<at::BFloat16, at::BFloat16>(g, x, lrow, lcol, urows, ucols, threads);
  if (g16) return dispatch<at::BFloat16, float>(g, x, lrow, lcol, urows, ucols, threads);
  if (x16) return dispatch<float, at::BFloat16>(g, x, lrow, lcol, urows, ucols, threads);
  return dispatch<float, float>(g, x, lrow, lcol, urows, ucols, threads);
}

// spmm_add: y[t, r] += sum_{k in row r} v[k] * x[t, cols[k]] for the CSR matrix S (crow [O + 1], cols [m],
// v [m] float32), into a given float32 y [T, O] (the base layer's output: no second output tensor).
// spmm_t: y[t, cols[k]] = sum v[k] * x[t, r], i.e. S^T x, into a new float32 y [T, I].
// Tokens go in tiles of TILE, as in sampled_dot: the tile of x is transposed into a feature-major buffer,
// then every stored value adds v[k] times one TILE-long row of it into one TILE-long row of the output
// buffer (a vectorised multiply-add across tokens), which is transposed back at the end of the tile.
// Measured here (1 thread, 2,048 tokens, 512 -> 1408, LoRA r=8's count): token by token with a scalar
// gather per value took 21 ms (spmm) and 37 ms (spmm_t); by tiles, see the benchmark.
template <typename X, bool TRANSPOSE>
void spmm_tiles(const X* x, const int64_t* crow, const int32_t* cols, const float* v, int64_t O, int64_t I,
                int64_t T, int64_t tile_begin, int64_t tile_end, float* y) {
  const int64_t x_width = TRANSPOSE ? O : I, y_width = TRANSPOSE ? I : O;
  std::vector<float> xt(x_width * TILE), yt(y_width * TILE);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * TILE, n = std::min(TILE, T - t0);
    if (n < TILE) std::fill(xt.begin(), xt.end(), 0.f);
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
      const int64_t nj = std::min(BLOCK, n - j0);
      for (int64_t f = 0; f < x_width; ++f) {
        float* d = xt.data() + f * TILE + j0;
        const X* s = x + (t0 + j0) * x_width + f;
        for (int64_t j = 0; j < nj; ++j) d[j] = static_cast<float>(s[j * x_width]);
      }
    }
    if (TRANSPOSE) {  // scatter: each value adds into the row of its column
      std::fill(yt.begin(), yt.end(), 0.f);
      for (int64_t r = 0; r < O; ++r) {
        const float* src = xt.data() + r * TILE;
        for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
          const float vk = v[k];
          float* dst = yt.data() + cols[k] * TILE;
#pragma omp simd
          for (int64_t j = 0; j < TILE; ++j) dst[j] += vk * src[j];
        }
      }
    } else {  // gather: a row's values sum in local tiles, stored once
      for (int64_t r = 0; r < O; ++r) {
        // ACCUMULATORS independent sums: with one, every multiply-add waits for the previous one's result
        // (measured: 4x slower than the scatter above for the same count of multiply-adds).
        float acc[ACCUMULATORS][TILE] = {};
        int64_t k = crow[r];
        for (; k + ACCUMULATORS <= crow[r + 1]; k += ACCUMULATORS) {
          for (int64_t u = 0; u < ACCUMULATORS; ++u) {
            const float vk = v[k + u];
            const float* src = xt.data() + cols[k + u] * TILE;
#pragma omp simd
            for (int64_t j = 0; j < TILE; ++j) acc[u][j] += vk * src[j];
          }
        }
        for (; k < crow[r + 1]; ++k) {
          const float vk = v[k];
          const float* src = xt.data() + cols[k] * TILE;
#pragma omp simd
          for (int64_t j = 0; j < TILE; ++j) acc[0][j] += vk * src[j];
        }
        float* dst = yt.data() + r * TILE;
#pragma omp simd
        for (int64_t j = 0; j < TILE; ++j) dst[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
      }
    }
    for (int64_t f0 = 0; f0 < y_width; f0 += FEATURE_BLOCK) {  // back to token-major, a block of rows at a time
      const int64_t nf = std::min(FEATURE_BLOCK, y_width - f0);
      for (int64_t j = 0; j < n; ++j) {
        float* d = y + (t0 + j) * y_width + f0;
        const float* s = yt.data() + f0 * TILE + j;
        if (TRANSPOSE) for (int64_t f = 0; f < nf; ++f) d[f] = s[f * TILE];
        else for (int64_t f = 0; f < nf; ++f) d[f] += s[f * TILE];
      }
    }
  }
}

template <bool TRANSPOSE>
torch::Tensor spmm_any(torch::Tensor y, torch::Tensor x, torch::Tensor crow, torch::Tensor cols, torch::Tensor v,
                       int64_t O, int64_t I, int64_t threads) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "spmm: x [T, features], contiguous, CPU");
  TORCH_CHECK(x.size(1) == (TRANSPOSE ? O : I), "spmm: x has ", x.size(1), " features, S is ", O, " x ", I);
  TORCH_CHECK(crow.scalar_type() == torch::kInt64 && crow.numel() == O + 1 && cols.scalar_type() == torch::kInt32 &&
              v.scalar_type() == torch::kFloat32 && v.numel() == cols.numel(),
              "spmm: crow int64 [O + 1], cols int32 [m], v float32 [m]");
  const bool x16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x16 || x.scalar_type() == torch::kFloat32, "spmm: float32 or bfloat16 activations");
  const int64_t T = x.size(0);
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2 && y.size(0) == T &&
              y.size(1) == (TRANSPOSE ? I : O), "spmm: the output must be float32 [T, ", TRANSPOSE ? I : O, "]");
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int32_t* cc = cols.data_ptr<int32_t>();
  const float* vp = v.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (T + TILE - 1) / TILE;
  threads = std::max<int64_t>(1, std::min(threads, tiles));
  auto work = [&](int64_t w) {
    const int64_t first = tiles * w / threads, last = tiles * (w + 1) / threads;
    if (x16) spmm_tiles<at::BFloat16, TRANSPOSE>(reinterpret_cast<const at::BFloat16*>(x.data_ptr()), cr, cc, vp, O, I, T,
                                                 first, last, yp);
    else spmm_tiles<float, TRANSPOSE>(x.data_ptr<float>(), cr, cc, vp, O, I, T, first, last, yp);
  };
  pybind11::gil_scoped_release release;
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < threads; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  return y;
}

torch::Tensor spmm_add(torch::Tensor y, torch::Tensor x, torch::Tensor crow, torch::Tensor cols, torch::Tensor v,
                       int64_t O, int64_t I, int64_t threads) {
  return spmm_any<false>(y, x, crow, cols, v, O, I, threads);
}

torch::Tensor spmm_t(torch::Tensor g, torch::Tensor crow, torch::Tensor cols, torch::Tensor v, int64_t O, int64_t I,
                     int64_t threads) {
  auto y = torch::empty({g.size(0), I}, g.options().dtype(torch::kFloat32));
  return spmm_any<true>(y, g, crow, cols, v, O, I, threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sampled_dot", &sampled_dot);
  m.def("spmm_add", &spmm_add);
  m.def("spmm_t", &spmm_t);
}
