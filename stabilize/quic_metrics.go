package stabilize

import (
	"github.com/prometheus/client_golang/prometheus"
)

// The metrics of QUIC termination (see metrics.go):
//
//	caddy_stabilize_quic_connections_accepted_total{handler}          counter
//	caddy_stabilize_quic_connections_active{handler}                  gauge
//	caddy_stabilize_quic_connections_failed_total{handler,reason}     counter
//	caddy_stabilize_quic_retries_total{handler}                       counter
//	caddy_stabilize_quic_0rtt_accepted_total{handler}                 counter
//	caddy_stabilize_upstream_quic_connections{upstream}               gauge
//	caddy_stabilize_upstream_quic_streams_total{upstream}             counter
//	caddy_stabilize_upstream_quic_stream_bytes_total{upstream,direction} counter
//	caddy_stabilize_quic_dropped_datagrams_total{listener,reason}     counter
//
// Handler counts belong to the handler instance that accepted the
// connection, as the other handler counters do. Dropped datagrams belong to
// the listener's transport, which outlives reloads: `listener` is its
// network/address, as in the layer4 server's listen.
var (
	quicAcceptedDesc = newMetricDesc("quic_connections_accepted_total",
		"Client QUIC connections whose handshake completed.", "handler")
	quicActiveDesc = newMetricDesc("quic_connections_active",
		"Client QUIC connections being relayed.", "handler")
	quicFailedDesc = newMetricDesc("quic_connections_failed_total",
		"Client QUIC connections that failed before they were relayed, by reason: alpn (no application protocol in common), certificate (none for the server name), tls (no TLS config), handshake (it did not complete), no_upstream, backend_dial.",
		"handler", "reason")
	quicRetriesDesc = newMetricDesc("quic_retries_total",
		"Retry packets sent (stateless_retry); a ClientHello in two Initial packets draws two.", "handler")
	quic0RTTDesc = newMetricDesc("quic_0rtt_accepted_total",
		"Client QUIC connections that used 0-RTT.", "handler")
	upstreamQUICConnsDesc = newMetricDesc("upstream_quic_connections",
		"Client QUIC connections relayed to the upstream now, across all handlers.", "upstream")
	upstreamQUICStreamsDesc = newMetricDesc("upstream_quic_streams_total",
		"QUIC streams relayed to and from the upstream (udp/ upstreams: requests).", "upstream")
	upstreamQUICBytesDesc = newMetricDesc("upstream_quic_stream_bytes_total",
		"Stream bytes relayed per upstream: direction to_upstream or from_upstream.", "upstream", "direction")
	quicDroppedDesc = newMetricDesc("quic_dropped_datagrams_total",
		"Datagrams of a listener's terminating QUIC transport dropped, by reason: queue_full (from clients: quic-go lagged behind), write_error (to clients: the send failed); quic-go's loss recovery resends. Cumulative across config reloads.",
		"listener", "reason")
)

// quicDescs are the descriptions of the QUIC metrics.
var quicDescs = []*prometheus.Desc{
	quicAcceptedDesc, quicActiveDesc, quicFailedDesc, quicRetriesDesc, quic0RTTDesc,
	upstreamQUICConnsDesc, upstreamQUICStreamsDesc, upstreamQUICBytesDesc, quicDroppedDesc,
}

// collectQUIC sends the QUIC metrics of a handler with a quic block.
func collectQUIC(ch chan<- prometheus.Metric, h *Handler, label string) {
	st := h.QUIC.stats
	if st == nil {
		return // Provision failed
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(quicAcceptedDesc, st.accepted.Load(), label)
	ch <- prometheus.MustNewConstMetric(quicActiveDesc, prometheus.GaugeValue, float64(st.active.Load()), label)
	for f := range numQUICFailures {
		counter(quicFailedDesc, st.failed[f].Load(), label, f.String())
	}
	counter(quicRetriesDesc, st.retries.Load(), label)
	counter(quic0RTTDesc, st.zeroRTT.Load(), label)
}

// collectQUICHost sends the QUIC metrics of an upstream of a handler with a
// quic block.
func collectQUICHost(ch chan<- prometheus.Metric, addr string, host *Host) {
	q := &host.quic
	ch <- prometheus.MustNewConstMetric(upstreamQUICConnsDesc, prometheus.GaugeValue, float64(q.conns.Load()), addr)
	ch <- prometheus.MustNewConstMetric(upstreamQUICStreamsDesc, prometheus.CounterValue, float64(q.streams.Load()), addr)
	ch <- prometheus.MustNewConstMetric(upstreamQUICBytesDesc, prometheus.CounterValue, float64(q.bytesUp.Load()), addr, directionToUpstream)
	ch <- prometheus.MustNewConstMetric(upstreamQUICBytesDesc, prometheus.CounterValue, float64(q.bytesDown.Load()), addr, directionFromUpstream)
}

// collectQUICTransports sends the dropped datagrams of every terminating
// transport.
func collectQUICTransports(ch chan<- prometheus.Metric) {
	var ts []*quicTransport
	quicTransports.Range(func(_, v any) bool {
		ts = append(ts, v.(*quicTransport))
		return true
	})
	for _, t := range ts {
		ch <- prometheus.MustNewConstMetric(quicDroppedDesc, prometheus.CounterValue, float64(t.conn.queueFull.Load()), t.key, "queue_full")
		ch <- prometheus.MustNewConstMetric(quicDroppedDesc, prometheus.CounterValue, float64(t.conn.writeErrors.Load()), t.key, "write_error")
	}
}
