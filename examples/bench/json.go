//go:build linux

package main

import (
	"encoding/json"
	"math"
)

// num is a measured number that may be unknown: NaN (or ±Inf), which
// encoding/json cannot write as a number, is JSON null, and null reads back
// as NaN.
type num float64

// nan is the unknown number.
var nan = num(math.NaN())

// known reports whether n is a finite number.
func (n num) known() bool {
	return !math.IsNaN(float64(n)) && !math.IsInf(float64(n), 0)
}

// MarshalJSON writes n as a JSON number, or null when it is unknown.
func (n num) MarshalJSON() ([]byte, error) {
	if !n.known() {
		return []byte("null"), nil
	}
	return json.Marshal(float64(n))
}

// UnmarshalJSON reads a JSON number, or null as NaN.
func (n *num) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*n = nan
		return nil
	}
	return json.Unmarshal(b, (*float64)(n))
}

// UnmarshalJSON reads a measurement; a number that a report written before
// it was measured lacks is unknown, not 0.
func (m *measurement) UnmarshalJSON(b []byte) error {
	type plain measurement
	m.setNaN()
	return json.Unmarshal(b, (*plain)(m))
}

// UnmarshalJSON reads a summary; the per idle flow figures, the load
// generator's CPU and the warm-up's figures that a report written before
// they were measured lacks are unknown, not 0.
func (s *summary) UnmarshalJSON(b []byte) error {
	type plain summary
	s.GoPerIdleB, s.KernelPerIdleB, s.SocketsPerIdle, s.LoadCPUPerDgramUS = nan, nan, nan, nan
	s.EstablishedMin, s.BusyMin, s.WarmupSeconds, s.SetupSeconds, s.SetupFlowsPerSecond = nan, nan, nan, nan, nan
	return json.Unmarshal(b, (*plain)(s))
}
