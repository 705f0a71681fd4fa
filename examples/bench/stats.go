//go:build linux

package main

import (
	"math"
	"slices"
)

// percentile returns the p-th percentile (0 < p ≤ 100) of sorted by the
// nearest-rank method, or NaN for no samples.
func percentile(sorted []int64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	// The epsilon keeps 99.9% of 1000 at rank 999 despite rounding.
	rank := int(math.Ceil(p/100*float64(len(sorted)) - 1e-9))
	rank = min(max(rank, 1), len(sorted))
	return float64(sorted[rank-1])
}

// median returns the median of xs, ignoring NaNs; NaN when none is left.
func median[F ~float64](xs []F) F {
	v := make([]F, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(float64(x)) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return F(math.NaN())
	}
	slices.Sort(v)
	m := len(v) / 2
	if len(v)%2 == 1 {
		return v[m]
	}
	return (v[m-1] + v[m]) / 2
}

// ratio is a / b, unknown when either is or b is 0.
func ratio(a, b num) num {
	if !a.known() || !b.known() || b == 0 {
		return nan
	}
	return a / b
}
