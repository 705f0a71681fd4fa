package stabilize

import (
	"github.com/caddyserver/caddy/v2"
)

// HealthChecks configures how upstreams are judged healthy. Every policy
// picks only from healthy upstreams.
type HealthChecks struct {
	// Active checks probe each upstream on a timer.
	Active *ActiveHealthChecks `json:"active,omitempty"`

	// Passive checks judge upstreams by live traffic.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`

	// When every upstream is down, drop datagrams (counted as `no_upstream`)
	// instead of the default, failing open: picking from all upstreams as if
	// they were healthy, counted as `all_down`.
	DropWhenAllDown bool `json:"drop_when_all_down,omitempty"`
}

// ActiveHealthChecks sends a probe datagram to each upstream every interval
// and judges the reply.
type ActiveHealthChecks struct {
	// The probe datagram, as text. Default: empty datagram.
	Send string `json:"send,omitempty"`

	// The probe datagram, in hexadecimal. Overrides send.
	SendHex string `json:"send_hex,omitempty"`

	// A regular expression the reply must match. With no expect, expect_exact
	// or expect_prefix, a check passes if no ICMP port-unreachable arrives
	// within the timeout (a reply also passes).
	Expect string `json:"expect,omitempty"`

	// The exact reply expected.
	ExpectExact string `json:"expect_exact,omitempty"`

	// A prefix the reply must start with.
	ExpectPrefix string `json:"expect_prefix,omitempty"`

	// The port to send probes to, if not the upstream's own.
	Port int `json:"port,omitempty"`

	// How often to probe each upstream. Default: 5s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long to wait for a reply. Default: 2s, at most the interval.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Consecutive passing checks that mark a down upstream up. Default: 1.
	Passes int `json:"passes,omitempty"`

	// Consecutive failing checks that mark an up upstream down. Default: 1.
	Fails int `json:"fails,omitempty"`
}

// PassiveHealthChecks judges upstreams by live traffic: an ICMP
// port-unreachable, or optionally a request left without a reply, is a
// failure; max_fails failures within fail_duration mark the upstream down
// for fail_duration.
type PassiveHealthChecks struct {
	// A datagram sent to an upstream that gets no reply from it within this
	// time counts as a failure. For request/response protocols only.
	// Default: 0 (off).
	ReplyTimeout caddy.Duration `json:"reply_timeout,omitempty"`

	// Failures within fail_duration that mark the upstream down. Default: 1.
	MaxFails int `json:"max_fails,omitempty"`

	// How long a failure is remembered, and how long an upstream stays down
	// once max_fails is reached. Default: 10s.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
}
