// The CUDA runtime, c10::cuda and cooperative-groups names the .cu sources use, and the
// launch macro: real ones under nvcc; in the CUDA emulation build (AIA_CUDA_EMULATION,
// compiled by the host compiler, see csrc/emulation/cuda_emulator.h) CPU stand-ins.
#pragma once

#ifdef AIA_CUDA_EMULATION
#include "emulation/cuda_emulator.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>

// kernel<<<grid, block, 0, stream>>>(args...), written so the emulator can run it too.
#define AIA_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif
