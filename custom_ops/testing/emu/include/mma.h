// Stub of the CUDA header mma.h for the CPU emulation (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
