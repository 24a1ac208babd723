// What this CPU can run, read once at run time. The extension is built for
// the x86-64 baseline kvmux requires (AVX2 + FMA + F16C, no -march=native), and
// kernels with faster paths compile those with per-function target attributes
// and choose among them from these flags.
#pragma once

// Whether this build carries the kernels beyond the baseline: their files use GCC target pragmas with the
// AVX512-BF16 and AMX intrinsics (GCC 11 or later). Elsewhere they are left out and reported unsupported.
#ifndef KVMUX_WIDE_KERNELS
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define KVMUX_WIDE_KERNELS 1
#else
#define KVMUX_WIDE_KERNELS 0
#endif
#endif

namespace kvmux {

struct CpuFeatures {
    bool avx2, fma, f16c;
    bool avx512f, avx512bw, avx512vl;  // the AVX-512 subset every AVX-512 kernel here needs
    bool avx512bf16, avx512vnni, avxvnni;
    bool amx_tile, amx_bf16, amx_int8;  // only when the OS also granted the tile state (Linux arch_prctl)
};

const CpuFeatures& cpu_features();

}  // namespace kvmux
