// Multi-scale deformable attention (Deformable DETR's op; MM-Interleaved folds its images into the level axis).
// Layouts (all contiguous, row-major):
//   value     [B, S, M, D]       S = sum_l H_l*W_l, levels one after another
//   shapes    [L, 2] int64 (H, W);  level_start [L] int64
//   loc       [B, Q, M, L, P, 2] normalised (x, y): 0 = outer edge of the first pixel, centres at (j+0.5)/W
//   attn      [B, Q, M, L, P]    already normalised
//   out       [B, Q, M, D]       (= [B, Q, M*D])
// out[b,q,m,c] = sum_{l,p} attn * bilinear(value[b, level l, m, c], h = y*H - 0.5, w = x*W - 0.5), corners outside
// the map counting as zero (= grid_sample, align_corners=False, padding_mode="zeros").
//
// One thread per output element (b, q, m, c) in a grid-stride loop, accumulation in T (float or double: double lets
// the CPU tests compare to ~1e-15), 64-bit element indices (B*Q*M*D and S*M*D overflow int32 at real sizes).
// Sizes arrive as int because NVRTC launches through torch pass Python ints as 32-bit; each size fits easily.
// The backward scatters with atomics into zero-initialised T buffers (fp32 on the GPU; never half atomics).
#include "portable.cuh"

__device__ __forceinline__ float mmi_floor(float x) { return floorf(x); }
__device__ __forceinline__ double mmi_floor(double x) { return floor(x); }

// The pixel cell around (h, w): fractional parts and the flat pixel index of its four corners
// (0,0) (0,1) (1,0) (1,1) as (row, col) offsets, or -1 for a corner outside the H x W map.
template <typename T>
struct Cell {
    T lh, lw;
    i64 off[4];
};

template <typename T>
__device__ __forceinline__ Cell<T> cell_at(T h, T w, int H, int W) {
    Cell<T> c;
    const int h0 = (int)mmi_floor(h), w0 = (int)mmi_floor(w);  // caller keeps h, w in [-1, H) x [-1, W)
    c.lh = h - (T)h0;
    c.lw = w - (T)w0;
    for (int k = 0; k < 4; ++k) {
        const int y = h0 + (k >> 1), x = w0 + (k & 1);
        c.off[k] = (y >= 0 && y < H && x >= 0 && x < W) ? (i64)y * W + x : -1;
    }
    return c;
}

// Pixel coordinates of a sampling location. `nan` is 0 for a finite location and NaN otherwise: a NaN or infinite
// location must poison the result (as it does in grid_sample), not vanish as "outside the map".
template <typename T>
__device__ __forceinline__ void pixel_coords(const T* loc, int H, int W, T& h, T& w, T& nan) {
    w = loc[0] * (T)W - (T)0.5;
    h = loc[1] * (T)H - (T)0.5;
    nan = (h - h) + (w - w);
}

// False when all four corners lie outside the map (value and every derivative exactly zero) or the location is not
// finite: such points are never floored and cast to int.
template <typename T>
__device__ __forceinline__ bool near_map(T h, T w, int H, int W) {
    return h >= (T)-1 && h < (T)H && w >= (T)-1 && w < (T)W;
}

template <typename T>
__device__ __forceinline__ void deform_attn_forward(const T* __restrict__ value, const i64* __restrict__ shapes,
                                                    const i64* __restrict__ level_start, const T* __restrict__ loc,
                                                    const T* __restrict__ attn, T* __restrict__ out, int B, int S,
                                                    int M, int D, int Q, int L, int P) {
    const i64 n = (i64)B * Q * M * D;
    const i64 MD = (i64)M * D;  // stride between neighbouring pixels of value
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (i64)gridDim.x * blockDim.x) {
        const int c = (int)(idx % D), m = (int)(idx / D % M);
        const i64 bq = idx / MD, b = bq / Q;
        i64 i = (bq * M + m) * L * P;  // index of (b, q, m, l=0, p=0) in attn; loc has twice as many entries
        T acc = 0;
        for (int l = 0; l < L; ++l) {
            const int H = (int)shapes[2 * l], W = (int)shapes[2 * l + 1];
            const T* v = value + (b * S + level_start[l]) * MD + (i64)m * D + c;  // pixel 0 of level l
            for (int p = 0; p < P; ++p, ++i) {
                T h, w, nan;
                pixel_coords(loc + 2 * i, H, W, h, w, nan);
                if (nan != 0) acc += nan;
                if (!near_map(h, w, H, W)) continue;
                const Cell<T> e = cell_at(h, w, H, W);
                const T wt[4] = {(1 - e.lh) * (1 - e.lw), (1 - e.lh) * e.lw, e.lh * (1 - e.lw), e.lh * e.lw};
                T val = 0;
                for (int k = 0; k < 4; ++k)
                    if (e.off[k] >= 0) val += wt[k] * v[e.off[k] * MD];
                acc += attn[i] * val;
            }
        }
        out[idx] = acc;
    }
}

// Same mapping as the forward; thread (b,q,m,c) adds its channel's share of every gradient:
//   d value[corner]  += a * g * corner weight
//   d attn           += g * val
//   d x              += a * g * W * dval/dw,   dval/dw = (1-lh)*(v01-v00) + lh*(v11-v10)
//   d y              += a * g * H * dval/dh,   dval/dh = (1-lw)*(v10-v00) + lw*(v11-v01)
// All D threads of a (b,q,m) add to the same attn/loc entries: simple, and correct with any launch configuration.
template <typename T>
__device__ __forceinline__ void deform_attn_backward(const T* __restrict__ value, const i64* __restrict__ shapes,
                                                     const i64* __restrict__ level_start, const T* __restrict__ loc,
                                                     const T* __restrict__ attn, const T* __restrict__ grad_out,
                                                     T* __restrict__ grad_value, T* __restrict__ grad_loc,
                                                     T* __restrict__ grad_attn, int B, int S, int M, int D, int Q,
                                                     int L, int P) {
    const i64 n = (i64)B * Q * M * D;
    const i64 MD = (i64)M * D;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (i64)gridDim.x * blockDim.x) {
        const int c = (int)(idx % D), m = (int)(idx / D % M);
        const i64 bq = idx / MD, b = bq / Q;
        const T g = grad_out[idx];
        i64 i = (bq * M + m) * L * P;
        for (int l = 0; l < L; ++l) {
            const int H = (int)shapes[2 * l], W = (int)shapes[2 * l + 1];
            const i64 base = (b * S + level_start[l]) * MD + (i64)m * D + c;
            const T* v = value + base;
            T* gv = grad_value + base;
            for (int p = 0; p < P; ++p, ++i) {
                T h, w, nan;
                pixel_coords(loc + 2 * i, H, W, h, w, nan);
                if (nan != 0) {  // NaN gradients for this point's location and weight
                    atomicAdd(grad_attn + i, nan);
                    atomicAdd(grad_loc + 2 * i, nan);
                    atomicAdd(grad_loc + 2 * i + 1, nan);
                }
                if (!near_map(h, w, H, W)) continue;
                const Cell<T> e = cell_at(h, w, H, W);
                const T hh = 1 - e.lh, hw = 1 - e.lw;
                const T wt[4] = {hh * hw, hh * e.lw, e.lh * hw, e.lh * e.lw};
                T cv[4];  // corner values, zero outside the map
                for (int k = 0; k < 4; ++k) cv[k] = e.off[k] >= 0 ? v[e.off[k] * MD] : (T)0;
                const T a = attn[i], ag = a * g;
                for (int k = 0; k < 4; ++k)
                    if (e.off[k] >= 0) atomicAdd(gv + e.off[k] * MD, ag * wt[k]);
                const T val = wt[0] * cv[0] + wt[1] * cv[1] + wt[2] * cv[2] + wt[3] * cv[3];
                const T dw = hh * (cv[1] - cv[0]) + e.lh * (cv[3] - cv[2]);
                const T dh = hw * (cv[2] - cv[0]) + e.lw * (cv[3] - cv[1]);
                atomicAdd(grad_attn + i, g * val);
                atomicAdd(grad_loc + 2 * i, ag * (T)W * dw);
                atomicAdd(grad_loc + 2 * i + 1, ag * (T)H * dh);
            }
        }
    }
}

// Entry points with C names, one pair of kernels per type, so NVRTC, nvcc and ctypes all find them unmangled.
// The *_launch host functions (not compiled by NVRTC, which builds device code only) serve the nvcc and g++ builds:
// one launch (grid x block threads, 1-D) on `stream` (ignored on the CPU); they return a cudaError_t (0 = success).
#define FWD_PARAMS(T)                                                                                         \
    const T *value, const i64 *shapes, const i64 *level_start, const T *loc, const T *attn, T *out, int B, \
        int S, int M, int D, int Q, int L, int P
#define BWD_PARAMS(T)                                                                                            \
    const T *value, const i64 *shapes, const i64 *level_start, const T *loc, const T *attn, const T *grad_out, \
        T *grad_value, T *grad_loc, T *grad_attn, int B, int S, int M, int D, int Q, int L, int P
#define FWD_ARGS value, shapes, level_start, loc, attn, out, B, S, M, D, Q, L, P
#define BWD_ARGS value, shapes, level_start, loc, attn, grad_out, grad_value, grad_loc, grad_attn, B, S, M, D, Q, L, P

#define MMI_KERNELS(T, suffix)                                                                                    \
    extern "C" __global__ void deform_attn_forward_##suffix(FWD_PARAMS(T)) { deform_attn_forward<T>(FWD_ARGS); } \
    extern "C" __global__ void deform_attn_backward_##suffix(BWD_PARAMS(T)) { deform_attn_backward<T>(BWD_ARGS); }
#define MMI_LAUNCHERS(T, suffix)                                                                   \
    extern "C" int deform_attn_forward_##suffix##_launch(void* stream, int grid, int block, FWD_PARAMS(T)) { \
        MMI_LAUNCH(deform_attn_forward_##suffix, grid, block, stream, FWD_ARGS);                  \
        return MMI_LAST_ERROR();                                                                  \
    }                                                                                             \
    extern "C" int deform_attn_backward_##suffix##_launch(void* stream, int grid, int block, BWD_PARAMS(T)) { \
        MMI_LAUNCH(deform_attn_backward_##suffix, grid, block, stream, BWD_ARGS);                 \
        return MMI_LAST_ERROR();                                                                  \
    }

MMI_KERNELS(float, f32)
MMI_KERNELS(double, f64)
#if !defined(__CUDACC_RTC__)
MMI_LAUNCHERS(float, f32)
MMI_LAUNCHERS(double, f64)
#endif
