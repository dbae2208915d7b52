// Read bandwidth of scattered expert slices, the memory pattern of decoding a MoE with small experts (one core).
//
// T tensors of E slices of S bytes each (E experts, S = one expert's bytes); per "token" K random slices of every
// tensor are read in increasing order (as MUL_MAT_ID visits experts), with 256-bit loads, then 100 MB of other data
// evicts them (as the rest of a model does). Modes:
//   all        every slice of every tensor (K = E: one contiguous stream per tensor)
//   scattered  K random slices, each read start to end
//   whole      scattered, and the whole next slice prefetched at once before each slice
//   chunked    scattered, each slice read in chunks of C bytes, the same chunk of the next 2 slices prefetched before
//              each chunk (what llama.cpp patch 0009 does)
// Build and run:  cc -O2 -mavx2 -o /tmp/bsr scripts/bench_scattered_reads.c && /tmp/bsr [K] [S] [C]
// (defaults: K 16, S 10240, C 2048: the 50% finegrained SmolLM2 file's 16 used of 48 experts, 32 neurons x 576).
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { E = 48, T = 90, TOKENS = 200 };
static const size_t EVICT = 100u << 20;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static __m256i read_range(__m256i acc, const char * p, size_t n) {
    for (size_t o = 0; o < n; o += 32) {
        acc = _mm256_add_epi8(acc, _mm256_load_si256((const __m256i *) (p + o)));
    }
    return acc;
}

static void prefetch_range(const char * p, size_t n) {
    for (size_t o = 0; o < n; o += 64) {
        __builtin_prefetch(p + o, 0, 1);
    }
}

int main(int argc, char ** argv) {
    const int    k = argc > 1 ? atoi(argv[1]) : 16;
    const size_t s = argc > 2 ? (size_t) atol(argv[2]) : 10240;
    const size_t c = argc > 3 ? (size_t) atol(argv[3]) : 2048;
    if (k < 1 || k > E || s < 64 || s % 64 || c < 64 || c % 64) {
        fprintf(stderr, "usage: %s [K 1..%d] [S: multiple of 64] [C: multiple of 64]\n", argv[0], E);
        return 2;
    }
    const size_t tensor = E * s;
    char * buf = aligned_alloc(64, T * tensor + EVICT);
    if (!buf) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(buf, 1, T * tensor + EVICT);
    const char * names[] = { "all", "scattered", "whole", "chunked" };
    printf("%d tensors x %d slices of %zu bytes, %d read per tensor and token, chunk %zu bytes\n", T, E, s, k, c);
    __m256i acc = _mm256_setzero_si256();
    for (int mode = 0; mode < 4; ++mode) {
        unsigned seed = 1;
        double   t_read = 0;
        size_t   bytes  = 0;
        for (int tok = 0; tok < TOKENS; ++tok) {
            const double t0 = now();
            for (int t = 0; t < T; ++t) {
                int ids[E];
                const int n = mode == 0 ? E : k;
                for (int e = 0; e < E; ++e) {
                    ids[e] = e;
                }
                for (int i = 0; i < n && mode != 0; ++i) {  // K distinct random slices, then sorted
                    const int j = i + rand_r(&seed) % (E - i), x = ids[i];
                    ids[i] = ids[j];
                    ids[j] = x;
                }
                for (int i = 0; i < n; ++i) {
                    for (int j = i + 1; j < n; ++j) {
                        if (ids[j] < ids[i]) {
                            const int x = ids[i];
                            ids[i] = ids[j];
                            ids[j] = x;
                        }
                    }
                }
                const char * base = buf + t * tensor;
                for (int i = 0; i < n; ++i) {
                    const char * p = base + ids[i] * s;
                    if (mode == 3) {
                        for (size_t o = 0; o < s; o += c) {
                            const size_t m = o + c < s ? c : s - o;
                            for (int d = 1; d <= 2 && i + d < n; ++d) {
                                prefetch_range(base + ids[i + d] * s + o, m);
                            }
                            acc = read_range(acc, p + o, m);
                        }
                    } else {
                        if (mode == 2 && i + 1 < n) {
                            prefetch_range(base + ids[i + 1] * s, s);
                        }
                        acc = read_range(acc, p, s);
                    }
                    bytes += s;
                }
            }
            t_read += now() - t0;
            acc = read_range(acc, buf + T * tensor, EVICT);
        }
        printf("%-10s %6.2f GB/s  (%.1f us per tensor)\n", names[mode], bytes / t_read / 1e9,
               t_read / TOKENS / T * 1e6);
    }
    int lanes[8];
    _mm256_storeu_si256((__m256i *) lanes, acc);
    return lanes[0] == 12345 ? 3 : 0;  // keeps the reads from being optimised away
}
