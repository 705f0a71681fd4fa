package stabilize

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"go.uber.org/zap"
)

// Metrics
//
// Every count the balancer keeps is an atomic that the hot path updates
// anyway (see Host and Handler). The metrics are read from them only when
// Prometheus scrapes: metricsCollector is a prometheus.Collector that turns
// them into constant metrics in Collect, so forwarding a datagram costs
// nothing extra for metrics.
//
// They are registered with the config's metrics registry, which Caddy serves
// on the admin endpoint's /metrics (and the `metrics` HTTP handler):
//
//	caddy_stabilize_upstream_datagrams_total{upstream,direction}      counter
//	caddy_stabilize_upstream_bytes_total{upstream,direction}          counter
//	caddy_stabilize_upstream_active_flows{upstream}                   gauge
//	caddy_stabilize_upstream_healthy{upstream}                        gauge
//	caddy_stabilize_upstream_health_check_duration_seconds{upstream}  histogram
//	caddy_stabilize_dropped_datagrams_total{handler,reason}           counter
//	caddy_stabilize_all_down_datagrams_total{handler}                 counter
//	caddy_stabilize_connection_ids{handler}                           gauge
//	caddy_stabilize_connection_id_misses_total{handler}               counter
//	caddy_stabilize_connection_down_datagrams_total{handler}          counter
//
// The `upstream` label is the resolved address of the upstream, host:port
// (the key of the shared host state, as in /stabilize/upstreams); an upstream
// that several handlers dial is reported once. `direction` is `to_upstream`
// (client datagrams sent to the upstream) or `from_upstream` (replies received
// from it). upstream_healthy is 0 while any check holds the address down
// (see Host.Healthy); /stabilize/upstreams has each handler's active
// verdict. Upstream counters live in the shared host state, so they are
// cumulative across config reloads for as long as some config keeps using
// the address.
//
// The `handler` label is the handler's name if it has one, else its ordinal
// among the stabilize handlers of the loaded config, in provisioning order:
// "0", "1", … The ordinal is stable across reloads as long as the handlers
// keep their order in the config; caddy-l4 provisions the routes of a
// server in order, but its servers in map order, so stabilize handlers
// spread over several layer4 servers may be numbered differently after a
// reload: name them. Handler counters belong to the
// handler instance and so start again from zero at every reload, which
// Prometheus treats as a counter reset.

const (
	metricsNamespace = "caddy"
	metricsSubsystem = "stabilize"
)

// Values of the `direction` label.
const (
	directionToUpstream   = "to_upstream"
	directionFromUpstream = "from_upstream"
)

func newMetricDesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, name), help, labels, nil)
}

// The descriptions of every stabilize metric. They are the same for every
// collector, so registering a second collector with a registry fails with
// prometheus.AlreadyRegisteredError, naming the first.
var (
	upstreamDatagramsDesc = newMetricDesc("upstream_datagrams_total",
		"Datagrams relayed per upstream: direction to_upstream counts client datagrams sent to the upstream, from_upstream the replies received from it. Cumulative across config reloads.",
		"upstream", "direction")
	upstreamBytesDesc = newMetricDesc("upstream_bytes_total",
		"Payload bytes relayed per upstream: direction to_upstream counts bytes sent to the upstream, from_upstream bytes received from it. Cumulative across config reloads.",
		"upstream", "direction")
	upstreamActiveFlowsDesc = newMetricDesc("upstream_active_flows",
		"Client flows currently assigned to the upstream (per-flow balancing only), across all handlers.",
		"upstream")
	upstreamHealthyDesc = newMetricDesc("upstream_healthy",
		"Whether no health check holds the upstream down (1) or some does (0): its passive checks, shared by address, or the active checks of any handler. A handler heeds only the checks it configures.",
		"upstream")
	upstreamHealthCheckDurationDesc = newMetricDesc("upstream_health_check_duration_seconds",
		"Round-trip time of passing active health checks of the upstream. Reported for upstreams of handlers with active health checks, or once any check has passed.",
		"upstream")
	droppedDatagramsDesc = newMetricDesc("dropped_datagrams_total",
		"Datagrams a handler dropped, by reason: no_upstream (no healthy upstream and drop_when_all_down), unknown_source (a reply from an address that is not an upstream), truncated (as long as the listener's buffer, so cut short), write_error (sending failed), reply_too_large (a reply longer than the reply buffer), send_buffer_full (a socket's send buffer was full), flow_limit (the first datagram of a flow over max_flows or max_flows_per_ip), socket_unavailable (the first datagram of a flow whose upstream socket could not be opened). Starts from zero at each config reload.",
		"handler", "reason")
	allDownDatagramsDesc = newMetricDesc("all_down_datagrams_total",
		"Datagrams a handler sent while every one of its upstreams was down, failing open to all of them (with QUIC termination: the connections, udp/ requests and DATAGRAM frames it placed so). Starts from zero at each config reload.",
		"handler")
	fastDroppedDatagramsDesc = newMetricDesc("fastudp_dropped_datagrams_total",
		"Datagrams a fastudp socket dropped before any handler saw them, by reason: queue_full (datagrams of new flows past the bounds of the queue where they wait for caddy-l4, or while no config listened) or truncated (longer than the listener's buffer).",
		"listener", "reason")
)

// metricsCollector reports the stabilize metrics of one config: of the
// handlers provisioned with its metrics registry, and of their upstreams.
type metricsCollector struct {
	mu       sync.Mutex
	handlers []metricsHandler // in provisioning order
}

// metricsHandler is a handler reported by a metricsCollector. Collect reads
// only what Provision has set before registering the handler, and atomics:
// Caddy serves the new config's /metrics while the config is still being
// provisioned.
type metricsHandler struct {
	h      *Handler
	label  string // the handler label: its name, or its ordinal
	active bool   // it runs active health checks
}

// registerMetrics adds h to the metrics of its config. The first stabilize
// handler of a config registers a collector with the config's metrics
// registry (a new one for every config); the others find it through
// prometheus.AlreadyRegisteredError. A failure to register is logged, not
// returned: metrics must not keep the balancer from running. A name that
// another handler of the config has is an error.
func (h *Handler) registerMetrics(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	c, err := collectorFor(reg)
	if err != nil {
		h.logger.Error("registering metrics", zap.Error(err))
		return nil
	}
	return c.add(h)
}

// collectorFor returns the collector registered with reg, registering a new
// one if there is none.
func collectorFor(reg prometheus.Registerer) (*metricsCollector, error) {
	c := new(metricsCollector)
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(*metricsCollector); ok {
			return existing, nil
		}
	}
	return nil, err
}

// add appends h to the handlers reported, labelled with its name or, if it
// has none, its ordinal. Names are not numbers (Provision), so a name
// clashes only with another handler's name.
func (c *metricsCollector) add(h *Handler) error {
	mh := metricsHandler{h: h, label: h.Name, active: h.HealthChecks != nil && h.HealthChecks.Active != nil}
	c.mu.Lock()
	defer c.mu.Unlock()
	if mh.label == "" {
		mh.label = strconv.Itoa(len(c.handlers))
	}
	for _, o := range c.handlers {
		if o.h.Name != "" && o.h.Name == h.Name {
			return fmt.Errorf("name %q: another stabilize handler of this config has it", h.Name)
		}
	}
	c.handlers = append(c.handlers, mh)
	return nil
}

// Describe sends the descriptions of every stabilize metric. It implements
// prometheus.Collector.
func (c *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		upstreamDatagramsDesc,
		upstreamBytesDesc,
		upstreamActiveFlowsDesc,
		upstreamHealthyDesc,
		upstreamHealthCheckDurationDesc,
		droppedDatagramsDesc,
		allDownDatagramsDesc,
		fastDroppedDatagramsDesc,
		connectionIDsDesc,
		connectionIDMissesDesc,
		connectionDownDatagramsDesc,
	} {
		ch <- d
	}
	for _, d := range quicDescs { // quic_metrics.go
		ch <- d
	}
}

// metricsHost is one upstream address to report, with whether any handler
// that dials it runs active health checks.
type metricsHost struct {
	addr   netip.AddrPort
	host   *Host
	active bool
	quic   bool // a handler with a quic block dials it
}

// Collect reads the counters of the handlers and of their upstreams. It
// implements prometheus.Collector.
func (c *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	handlers := c.handlers[:len(c.handlers):len(c.handlers)]
	c.mu.Unlock()

	var order []*metricsHost
	byAddr := make(map[netip.AddrPort]*metricsHost)
	for _, mh := range handlers {
		h, label := mh.h, mh.label
		for r := range numDropReasons {
			ch <- prometheus.MustNewConstMetric(droppedDatagramsDesc, prometheus.CounterValue,
				float64(h.drops[r].Load()), label, r.String())
		}
		ch <- prometheus.MustNewConstMetric(allDownDatagramsDesc, prometheus.CounterValue,
			float64(h.allDownSent.Load()), label)
		if r, ok := h.router.(*perConnectionRouter); ok {
			r.collect(ch, label)
		}
		if h.QUIC != nil {
			collectQUIC(ch, h, label) // quic_metrics.go
		}

		for _, u := range h.Upstreams {
			if u.host == nil {
				continue
			}
			host := byAddr[u.addr]
			if host == nil {
				host = &metricsHost{addr: u.addr, host: u.host}
				byAddr[u.addr] = host
				order = append(order, host)
			}
			host.active = host.active || mh.active
			host.quic = host.quic || h.QUIC != nil
		}
	}

	for _, host := range order {
		collectHost(ch, host)
	}
	for _, s := range fastudp.Sockets() {
		queueFull, truncated := s.Drops()
		ch <- prometheus.MustNewConstMetric(fastDroppedDatagramsDesc, prometheus.CounterValue, float64(queueFull), s.Key(), "queue_full")
		ch <- prometheus.MustNewConstMetric(fastDroppedDatagramsDesc, prometheus.CounterValue, float64(truncated), s.Key(), "truncated")
	}
	collectQUICTransports(ch) // quic_metrics.go
}

// collectHost sends the metrics of one upstream.
func collectHost(ch chan<- prometheus.Metric, mh *metricsHost) {
	addr, host := mh.addr.String(), mh.host
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(upstreamDatagramsDesc, host.datagramsSent.Load(), addr, directionToUpstream)
	counter(upstreamDatagramsDesc, host.datagramsReceived.Load(), addr, directionFromUpstream)
	counter(upstreamBytesDesc, host.bytesSent.Load(), addr, directionToUpstream)
	counter(upstreamBytesDesc, host.bytesReceived.Load(), addr, directionFromUpstream)

	ch <- prometheus.MustNewConstMetric(upstreamActiveFlowsDesc, prometheus.GaugeValue, float64(host.Flows()), addr)
	healthy := 0.0
	if host.Healthy() {
		healthy = 1
	}
	ch <- prometheus.MustNewConstMetric(upstreamHealthyDesc, prometheus.GaugeValue, healthy, addr)

	if mh.quic {
		collectQUICHost(ch, addr, host)
	}
	count, sum, buckets := host.health.latency.snapshot()
	if mh.active || count > 0 {
		ch <- prometheus.MustNewConstHistogram(upstreamHealthCheckDurationDesc, count, sum, buckets, addr)
	}
}

// Interface guards
var _ prometheus.Collector = (*metricsCollector)(nil)
