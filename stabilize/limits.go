package stabilize

import (
	"fmt"
	"net/netip"
)

// Flow limits
//
// Every flow holds one upstream-facing socket, so a flood of spoofed client
// addresses would exhaust the process's file descriptors and then fail
// every client. max_flows caps a handler's flows and max_flows_per_ip the
// flows of one client address; a new flow over either cap is refused,
// counted as flow_limit and logged once, while established flows go on.

// minDefaultMaxFlows is the smallest default of max_flows.
const minDefaultMaxFlows = 64

// provisionLimits validates and resolves max_flows and max_flows_per_ip.
func (h *Handler) provisionLimits() error {
	switch {
	case h.MaxFlows < -1:
		return fmt.Errorf("max_flows %d: must be -1 (no limit), 0 (the default) or positive", h.MaxFlows)
	case h.MaxFlows == -1:
		h.maxFlows = 0
	case h.MaxFlows == 0:
		h.maxFlows = defaultMaxFlows()
	default:
		h.maxFlows = h.MaxFlows
	}
	if h.MaxFlowsPerIP < 0 {
		return fmt.Errorf("max_flows_per_ip %d: must not be negative", h.MaxFlowsPerIP)
	}
	return nil
}

// defaultMaxFlows is three quarters of the process's open-file limit, which
// leaves room for the listeners, the admin API and other handlers.
func defaultMaxFlows() int {
	return max(minDefaultMaxFlows, int(min(fileLimit(), 1<<22)*3/4))
}

// admit counts a new flow from ip, or reports false when a limit refuses it.
func (h *Handler) admit(ip netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.maxFlows > 0 && h.nflows >= h.maxFlows {
		return false
	}
	if h.MaxFlowsPerIP > 0 && h.perIP[ip] >= h.MaxFlowsPerIP {
		return false
	}
	h.count(ip, 1)
	return true
}

// unadmit uncounts a flow from ip that admit counted.
func (h *Handler) unadmit(ip netip.Addr) {
	h.mu.Lock()
	h.count(ip, -1)
	h.mu.Unlock()
}

// count adds d to the flows of ip. h.mu is held.
func (h *Handler) count(ip netip.Addr, d int) {
	h.nflows += d
	if h.MaxFlowsPerIP > 0 {
		if n := h.perIP[ip] + d; n > 0 {
			h.perIP[ip] = n
		} else {
			delete(h.perIP, ip)
		}
	}
}

// adopt counts a flow that a reload moves to h, over the limits if need
// be: established flows are never refused. It reports false once h is
// closing.
func (h *Handler) adopt(fl *Flow) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing.Load() {
		return false
	}
	h.flows[fl] = struct{}{}
	h.count(fl.client.Addr(), 1)
	return true
}

// forget removes a flow from h's flows and limits.
func (h *Handler) forget(fl *Flow) {
	h.mu.Lock()
	if _, ok := h.flows[fl]; ok {
		delete(h.flows, fl)
		h.count(fl.client.Addr(), -1)
	}
	h.mu.Unlock()
}
