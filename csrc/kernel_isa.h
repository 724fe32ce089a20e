#pragma once
// Must precede every ATen include of a kernel file: picks the at::vec implementation for the ISA the
// extension is compiled for (setup.py builds with -march=native by default).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#endif
