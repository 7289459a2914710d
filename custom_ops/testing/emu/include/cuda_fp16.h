// Stub of the CUDA header cuda_fp16.h for the CPU emulation (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
