/* A yardstick for timing under a competing load (bench --load): what the machine gives a
 * parallel program of T threads. Units of multiply-adds on registers alone (no memory traffic),
 * taken one at a time by whichever of the T threads is free, and no wait but the loop's end: a
 * thread the scheduler takes off its core leaves the rest of its units to the others. Its loaded
 * / idle latency is the share of the machine the scheduler gives T threads of one process, which
 * no program of T threads can better by its own design. No Python API here. */
#ifndef DYVEDEEP_DV_YARDSTICK_H
#define DYVEDEEP_DV_YARDSTICK_H

#include <omp.h>
#include "dv_vector.h"

/* `units` units of 8 chains of machine vectors, `iters` multiply-adds each (v = 0.999 v + 0.001:
 * every value stays in [0, 1], no subnormal), shared out by `threads` threads. Returns the sum
 * of every unit's result: each unit gives the same float, so any thread count and order gives
 * the same sum (exact in double), and a unit skipped or run twice would change it. */
static double dv_yardstick(int threads, int units, int iters)
{
    double total = 0.0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(+ : total)
    for (int u = 0; u < units; ++u) {
        dv_vn zero = {0}, a[8];
        for (int c = 0; c < 8; ++c) a[c] = zero + 0.125f * (float)c;
        for (int i = 0; i < iters; ++i)
            for (int c = 0; c < 8; ++c) a[c] = a[c] * 0.999f + 0.001f;
        float unit = 0.0f;
        for (int c = 0; c < 8; ++c) unit += a[c][0];
        total += unit;
    }
    return total;
}

#endif
