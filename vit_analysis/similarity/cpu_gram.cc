// Centred linear Gram of one layer on CPU: an XLA FFI handler that calls BLAS SYRK.
//
// G = (X - 1 mu^T)(X - 1 mu^T)^T = C X X^T C for x: [..., m, p] float32 (row-major, any number
// of leading batch dimensions), mu the column means. SYRK computes one triangle of the Gram, half
// the FLOPs of a GEMM; the other triangle is copied. The features are centred one column chunk
// at a time into a buffer that stays in cache while SYRK reads it, so centring costs no extra
// pass over memory. Chunk Grams are summed in a fixed order (beta = 1, in up to four partial
// Grams that XLA's thread pool may run in parallel, added in order), so a Gram is the same bits
// whatever the batch, device or threads it is computed on. Why and what it costs:
// docs/method.md#numerics-and-checks.
//
// The SYRK is ssyrk of the OpenBLAS that SciPy loaded (Fortran interface, 32-bit ints,
// column-major); Python passes its address, and that of the same library's
// openblas_set_num_threads_local, once through vit_analysis_set_blas.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Ssyrk = void (*)(const char* uplo, const char* trans, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* beta,
                       float* c, const int* ldc);

// OpenBLAS's openblas_set_num_threads_local(n): sets the library's thread count (for every thread
// of a pthreads build) and returns the previous one.
using SetThreads = int (*)(int);

std::atomic<Ssyrk> g_ssyrk{nullptr};
std::atomic<SetThreads> g_set_threads{nullptr};

// SYRK runs on one thread per call while any of these calls is running, because XLA already runs
// the Grams of independent layers concurrently on its thread pool: OpenBLAS's own threads on top
// of those oversubscribe the cores (measured 8-25x slower on 2 cores). The first call to enter
// sets one thread, the last to leave restores the count it found, so concurrent calls never
// restore each other's setting; SciPy's other callers get their threads back between steps.
class OneBlasThread {
 public:
  explicit OneBlasThread(SetThreads set_threads) : set_threads_(set_threads) {
    std::lock_guard<std::mutex> hold(mutex_);
    if (active_++ == 0) saved_ = set_threads_(1);
  }
  ~OneBlasThread() {
    std::lock_guard<std::mutex> hold(mutex_);
    if (--active_ == 0) set_threads_(saved_);
  }
  // Whether this is the only Gram call running (XLA is not running layers side by side).
  static bool Alone() {
    std::lock_guard<std::mutex> hold(mutex_);
    return active_ == 1;
  }

 private:
  static std::mutex mutex_;
  static int active_;
  static int saved_;
  SetThreads set_threads_;
};
std::mutex OneBlasThread::mutex_;
int OneBlasThread::active_ = 0;
int OneBlasThread::saved_ = 0;

// Floats per centred chunk (512 KB): the chunk read for the means and its centred copy both stay
// in a 1 MB L2 until SYRK packs the copy (2^17 to 2^20 measured within 10%, 2^17 fastest).
constexpr int64_t kChunkElements = int64_t{1} << 17;
constexpr int64_t kMinChunkColumns = 256;

// out [m, width] = x[:, :width] (row stride p) minus its column means. The means are summed in
// float64 and split into float32 hi + lo, so (x - hi) - lo is the float64 difference rounded
// once or twice whatever the offset, in float32 arithmetic only (vectorised at full width).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void CentreChunk(const float* x, int64_t m, int64_t p, int64_t width, int64_t ld, double* mean,
                 float* hi, float* lo, float* out) {
  for (int64_t j = 0; j < width; ++j) mean[j] = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    const float* row = x + i * p;
    for (int64_t j = 0; j < width; ++j) mean[j] += static_cast<double>(row[j]);
  }
  const double inv_m = 1.0 / static_cast<double>(m);
  for (int64_t j = 0; j < width; ++j) {
    const double mu = mean[j] * inv_m;
    hi[j] = static_cast<float>(mu);
    lo[j] = static_cast<float>(mu - static_cast<double>(hi[j]));
  }
  for (int64_t i = 0; i < m; ++i) {
    const float* row = x + i * p;
    float* centred = out + i * ld;
    for (int64_t j = 0; j < width; ++j) centred[j] = (row[j] - hi[j]) - lo[j];
  }
}

// Row stride of the centred chunk: a multiple of 16 floats (64-byte rows) that is an odd multiple
// of 16, so rows do not map to the same cache sets (a 4,096-float stride made SYRK's packing
// 30% slower).
int64_t Stride(int64_t width) {
  const int64_t lines = (width + 15) / 16;
  return 16 * (lines % 2 == 0 ? lines + 1 : lines);
}

// A Gram is the sum of kParts partial Grams, part t summing the SYRKs of the t-th run of
// consecutive column chunks (a quarter of them); the parts are then added in order. The split is
// fixed (it depends on the shapes only), so the bits do not depend on which threads ran them.
// While other Gram calls run (XLA runs the layers of a step side by side) the calling thread
// runs every part itself: a caller waiting for a part taken by a busy pool thread would hold its
// core idle (measured 10-19% slower). A Gram computed alone (one layer, or a program too small
// for XLA to run layers concurrently) offers its parts to XLA's thread pool: ~1.7x faster on 2
// cores.
constexpr int kParts = 4;

// partial [m, m] (lower triangle, column-major) = sum of the SYRKs of chunks [first, last).
void PartialGram(const float* x, int64_t m, int64_t p, int64_t chunk, int64_t first,
                 int64_t last, float* partial, Ssyrk ssyrk) {
  thread_local std::vector<double> mean;
  thread_local std::vector<float> hi, lo, chunk_buffer;
  chunk_buffer.resize(static_cast<size_t>(m * Stride(chunk)));
  mean.resize(static_cast<size_t>(chunk));
  hi.resize(static_cast<size_t>(chunk));
  lo.resize(static_cast<size_t>(chunk));
  const int n = static_cast<int>(m);
  const float one = 1.0f, zero = 0.0f;
  bool first_chunk = true;
  for (int64_t c0 = first * chunk; c0 < std::min(p, last * chunk); c0 += chunk) {
    const int64_t width = std::min(chunk, p - c0);
    const int64_t ld = Stride(width);
    CentreChunk(x + c0, m, p, width, ld, mean.data(), hi.data(), lo.data(), chunk_buffer.data());
    // Row-major [m, ld] is column-major A = [ld, m] (first `width` rows used); G = A^T A ('T'),
    // lower triangle in column-major order, i.e. partial[i * m + j] for j >= i.
    const int k = static_cast<int>(width), lda = static_cast<int>(ld);
    ssyrk("L", "T", &n, &k, &one, chunk_buffer.data(), &lda, first_chunk ? &zero : &one,
          partial, &n);
    first_chunk = false;
  }
}

// What the parts of one Gram share; helpers that start after the Gram is done find no part left
// and touch nothing else.
struct GramParts {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  int num_parts = 0;
  std::vector<float> partials;  // [num_parts - 1, m, m]; part 0 writes the Gram itself
};

// gram [m, m] = centred x [m, p] times its transpose.
void CentredGram(const float* x, int64_t m, int64_t p, float* gram, Ssyrk ssyrk,
                 ffi::ThreadPool& pool) {
  const int64_t chunk = std::min(p, std::max(kMinChunkColumns, kChunkElements / m));
  const int64_t num_chunks = (p + chunk - 1) / chunk;
  auto parts = std::make_shared<GramParts>();
  parts->num_parts = static_cast<int>(std::min<int64_t>(kParts, num_chunks));
  parts->partials.resize(static_cast<size_t>((parts->num_parts - 1) * m * m));
  const int num_parts = parts->num_parts;
  auto run = [parts, x, m, p, chunk, num_chunks, gram, ssyrk]() {
    for (int t = parts->next++; t < parts->num_parts; t = parts->next++) {
      float* out = t == 0 ? gram : parts->partials.data() + (t - 1) * m * m;
      PartialGram(x, m, p, chunk, t * num_chunks / parts->num_parts,
                  (t + 1) * num_chunks / parts->num_parts, out, ssyrk);
      parts->done++;
    }
  };
  if (OneBlasThread::Alone()) {
    for (int t = 1; t < num_parts; ++t) pool.Schedule([run]() { run(); });
  }
  run();
  while (parts->done.load() < num_parts) std::this_thread::yield();
  for (int t = 1; t < num_parts; ++t) {  // in order: the same bits whoever ran which part
    const float* partial = parts->partials.data() + (t - 1) * m * m;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = i; j < m; ++j) gram[i * m + j] += partial[i * m + j];
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = i + 1; j < m; ++j) gram[j * m + i] = gram[i * m + j];
  }
}

ffi::Error CentredGramsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::ResultBuffer<ffi::F32> gram) {
  const Ssyrk ssyrk = g_ssyrk.load();
  const SetThreads set_threads = g_set_threads.load();
  if (ssyrk == nullptr || set_threads == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "vit_analysis cpu_gram: no SYRK registered (vit_analysis_set_blas)");
  }
  const auto dims = x.dimensions();
  if (dims.size() < 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vit_analysis cpu_gram: features must be [..., m, p]");
  }
  const int64_t m = dims[dims.size() - 2], p = dims[dims.size() - 1];
  if (m > INT32_MAX) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vit_analysis cpu_gram: m = " + std::to_string(m) +
                          " examples is beyond 32-bit BLAS indices");
  }
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < dims.size(); ++d) batch *= dims[d];
  if (m == 0) return ffi::Error::Success();
  OneBlasThread one_thread(set_threads);
  const float* in = x.typed_data();
  float* out = gram->typed_data();
  for (int64_t b = 0; b < batch; ++b) {
    if (p == 0) {
      std::fill(out + b * m * m, out + (b + 1) * m * m, 0.0f);
      continue;
    }
    CentredGram(in + b * m * p, m, p, out + b * m * m, ssyrk, pool);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAnalysisCentredGrams, CentredGramsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" void vit_analysis_set_blas(void* ssyrk, void* set_threads) {
  g_set_threads.store(reinterpret_cast<SetThreads>(set_threads));
  g_ssyrk.store(reinterpret_cast<Ssyrk>(ssyrk));
}
