#pragma once

// Hot loops in an AVX2 copy as well, chosen when the program starts on a CPU that has it: the
// baseline x86-64 build only has SSE2, whose vectors are half as wide and which lacks the
// instructions that narrow 32-bit lanes to 16 cheaply. Results are the same either way (the
// loops marked with it do no reassociation that depends on the vector width).
#if defined(__x86_64__) && defined(__GNUC__)
#define GRADFIX_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define GRADFIX_AVX2_CLONE
#endif
