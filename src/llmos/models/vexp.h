/* exp(x) for the kernels' softmax and SiLU: within 2 ulp for |x| <= 87 (Cephes' polynomial;
 * clamped beyond), branch-free, so that a loop of it vectorizes, where a libm call per element
 * cost as much as the products around it. */
#ifndef LLMOS_VEXP_H
#define LLMOS_VEXP_H

#include <stdint.h>
#include <string.h>

static inline float exp_f32(float x) {
    x = x < -87.f ? -87.f : x > 87.f ? 87.f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

#endif
