// What the AMX kernels (linear_bf16.cpp, quant_tiles_amx.cpp) share: the layout ldtilecfg reads. A plain struct,
// no functions, so files compiled for different instruction sets include it without sharing inline code.
#pragma once

#include <cstdint>

namespace kvmux {

struct TileConfig {  // palette 1
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

}  // namespace kvmux
