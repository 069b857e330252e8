// aia_cuda_persistent.cu compiled by the host compiler against the CUDA emulator (cuda_emulator.h):
// part of the emulation build only (AIA_NATIVE_CUDA_EMULATION=1).
#ifndef AIA_CUDA_EMULATION
#error "built only with -DAIA_CUDA_EMULATION (aia_kernels/native/__init__.py)"
#endif
#include "aia_cuda_persistent.cu"
