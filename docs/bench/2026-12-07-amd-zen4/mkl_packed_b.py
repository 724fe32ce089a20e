"""MKL's packed-B sgemm (cblas_sgemm_pack / cblas_sgemm_compute, exported by libtorch_cpu) against plain sgemm_ at
the one pass's fp32 tile shapes, one thread, B packed once outside the timed loop (best of 3 rounds of 200 calls).

    python docs/bench/2026-12-07-amd-zen4/mkl_packed_b.py

AMD EPYC Zen 4 (family 25 model 17), 2026-12-07:
    forward logits (W_blk x H^T) 256x256x896: plain 101  packed-B 99 GFLOP/s (1 thread), err 0.0e+00
    1-pass dW (dZ^T x H) 256x896x256: plain 99  packed-B 98 GFLOP/s (1 thread), err 0.0e+00
    1-pass dH (dZ x W_grp) 256x896x1024: plain 85  packed-B 94 GFLOP/s (1 thread), err 0.0e+00
"""
import ctypes, os, time, torch, numpy as np
torch.set_num_threads(1)
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so'))
RM, NT, PACKED, AMAT, BMAT = 101, 111, 151, 161, 162
c_int, c_float, P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
lib.cblas_sgemm_pack_get_size.argtypes = [c_int, c_int, c_int, c_int]
lib.cblas_sgemm_pack.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, P, c_int, P]
lib.cblas_sgemm_compute.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, P, c_int, P, c_int, c_float, P, c_int]
def bench(m, n, k, reps=200, name=""):
    a = torch.randn(m, k); b = torch.randn(k, n); c = torch.empty(m, n)
    sz = lib.cblas_sgemm_pack_get_size(BMAT, m, n, k)
    bp = torch.empty(sz // 4 + 16)
    lib.cblas_sgemm_pack(RM, BMAT, NT, m, n, k, 1.0, b.data_ptr(), n, bp.data_ptr())
    M_, N_, K_, la, lb, lc = (ctypes.c_int(x) for x in (m, n, k, k, n, n)); one, zero = ctypes.c_float(1), ctypes.c_float(0)
    def plain(): lib.sgemm_(b"N", b"N", ctypes.byref(N_), ctypes.byref(M_), ctypes.byref(K_), ctypes.byref(one), P(b.data_ptr()), ctypes.byref(lb), P(a.data_ptr()), ctypes.byref(la), ctypes.byref(zero), P(c.data_ptr()), ctypes.byref(lc))
    def packed(): lib.cblas_sgemm_compute(RM, NT, PACKED, m, n, k, a.data_ptr(), k, bp.data_ptr(), n, 0.0, c.data_ptr(), n)
    packed(); ref = (a @ b); err = (c - ref).abs().max().item()
    for f in (plain, packed): f()
    res = {}
    for rnd in range(3):
        for nm, f in (("plain", plain), ("packedB", packed)):
            t0 = time.perf_counter()
            for _ in range(reps): f()
            res.setdefault(nm, []).append(2*m*n*k*reps/(time.perf_counter()-t0)/1e9)
    print(f"{name} {m}x{n}x{k}: plain {max(res['plain']):.0f}  packed-B {max(res['packedB']):.0f} GFLOP/s (1 thread), err {err:.1e}")
bench(256, 256, 896, name="forward logits (W_blk x H^T)")
bench(256, 896, 256, name="1-pass dW (dZ^T x H)")
bench(256, 896, 1024, name="1-pass dH (dZ x W_grp)")
