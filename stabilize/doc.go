// Package stabilize is a UDP load balancer for Caddy: the caddy-l4 handler
// `layer4.handlers.stabilize`. caddy-l4 hands it one client flow (a client
// address and port) at a time; it spreads the flow's datagrams over its
// upstreams, per packet, per flow or per QUIC connection, and relays the
// replies back; or it terminates QUIC and relays each connection.
//
// # The data path
//
// A datagram enters by one of two doors and leaves by one function:
//
//   - caddy-l4's Handle (handle.go), called once per new client flow on
//     `udp/` and `fastudp/` listeners. It opens the Flow and reads the flow
//     until caddy-l4 ends it, never blocking on an upstream.
//   - the fastudp socket (internal/fastudp). Once a flow is open, the socket
//     delivers the flow's datagrams to it directly (Flow is its
//     fastudp.Endpoint), bypassing caddy-l4's per-datagram dispatch; after
//     two seconds Handle returns and the socket's reaper ends the flow when
//     it goes idle. The socket reads with UDP GRO, and splits a client's
//     coalesced burst into the datagrams sent before delivering any. A
//     client's datagrams before its flow opens wait for caddy-l4 in the
//     socket's queue, bounded by bytes, so that a burst of new flows is
//     set up without loss.
//
// Both call Flow.forwardBatch (forward.go), the one place that checks
// truncation, asks the handler's router for an upstream, prepends the PROXY
// header and sends without blocking, counting every drop by reason. The
// router is the granularity (router.go): per packet asks the policy for
// every datagram, per flow once and again when the flow's upstream goes
// down, per connection (router_connection.go) routes QUIC packets by
// connection ID: a QUIC-LB decode, the IDs learned from the servers'
// replies (a replyObserver that Flow.reply calls), then as per flow. All
// take their candidates from Handler.candidates, which owns the
// health rule: healthy upstreams only, and when every one is down, all of
// them (fail open, counted) or none (drop_when_all_down). Policies are
// modules that pick for a Request (selectionpolicies.go): a client address,
// or a key such as a QUIC connection ID.
//
// Each flow owns one upstream-facing socket, so that replies find their
// client; per flow (Linux) it is connected to the flow's upstream from a
// source port shared with flows to other upstreams (sourceports.go), so
// ephemeral ports do not limit the flows. A fastudp read batch's datagrams
// of one flow are forwarded in one call (forwardBatch) and leave as one UDP
// GSO send or sendmmsg (sendbatch_linux.go). A reply reactor
// (reply_linux.go: epoll, recvmmsg) reads the replies of many flows, accepts
// them only from the handler's upstreams, and sends them out of the
// listener's own socket with sendmmsg, replies to one client of one size as
// one GSO send, on `udp/` and `fastudp/` alike, dropping (never waiting)
// when the socket is full. A fastudp socket bound to an unspecified address
// reads each datagram's destination address (IP_PKTINFO); the flow keeps
// the latest (Flow.setDst) as its replies' source, which a client that
// sent to another of the host's addresses than the route's needs, and as
// its PROXY header's destination; a terminating transport gets it as
// quic-go's socket would (quicConn.ReadBatch). caddy-l4 reads `udp/`
// without it, so there replies leave from the route's address. A `udp/`
// listener's socket gets a fastudp socket's buffers from its first flow
// on (Handler.growListener), as the system's default overflows in a burst.
//
// On Linux the flow sockets stay out of Go's netpoller (udpio.Socket):
// only the reactor's epoll set watches them, so a reply costs one epoll
// event, not a second one in the runtime's set, and
// the data path's raw system calls touch no poll descriptor. With many
// flows, whose memory has gone cold in the CPU's cache, both directions
// read the state of a batch's flows once before relaying the first
// (fastudp.Warmer, the reactor's readyFlows), so that the cache misses
// overlap; a Flow keeps what every datagram reads in its first lines, and
// a connected socket sends without an address, on its cached route.
// Settings of a fastudp socket belong to its address, not to a handler, so
// they live in the stabilize app (app.go): fastudp_readers, the socket's
// SO_REUSEPORT readers.
//
// # QUIC termination
//
// With a quic block, Handle feeds the flow to its listener's one
// quic.Transport instead of forwarding it (quic_transport.go): the
// transport's PacketConn (quic_conn.go) merges the datagrams of every flow
// and of fastudp endpoints, and writes straight out of the listener's
// socket to any address, so a migrated or rebound client, a new flow, keeps
// its connection. On Linux it gives quic-go its fast path
// (quic_conn_linux.go): batched reads, writes with GSO and ECN, and Don't
// Fragment on every socket writes go out of, for path-MTU discovery. The
// transport lives in a UsagePool keyed by the listener; the handler that
// the listener's flows reach serves its new connections; after a reload
// the transport waits for a flow to claim it (fastudp endpoints pass their
// datagrams back to caddy-l4 meanwhile) and is released if none does
// within the connections' idle timeout. Each accepted
// connection is relayed (quic_relay.go) to one backend connection on a quic/ upstream
// picked by the policy from Handler.candidates, or stream by stream to udp/
// upstreams (quic_udp.go), picked through the transport's current handler,
// so that reloads and health apply to open connections. Backend connections share one transport (quic_backend.go) and
// resume TLS sessions kept per upstream host and TLS settings
// (quic_sessions.go).
//
// # Limits
//
// max_flows and max_flows_per_ip (limits.go) refuse new flows over a cap
// before they cost a socket. Established flows are never refused: flows that
// a reload moves to a new handler count against its limits, even over them.
//
// # Reloads
//
// Every admin API change provisions new handlers before it cleans up the
// old ones. What must outlive a reload lives in package-level pools: the
// upstream Hosts (passive health and counters) by address, active-check
// probers by address and check settings, flow affinity and the handler
// lineage by the handler's identity (its granularity, policy and whether it
// terminates QUIC; see reload.go), `per connection`'s learned connection
// IDs by identity and then listener (cidtable.go), and fastudp sockets by
// address. In Cleanup an old handler moves each fastudp flow whose upstream its
// successor still has, and whose socket a config still listens on, to the
// successor, keeping the flow's upstream-facing socket, so no reply in
// flight is lost; other flows end, and the client's next datagram finds its
// upstream in the affinity table. A flow's successor is a handler of its
// identity that serves its listener: a handler learns, as it is
// provisioned, the listen addresses of the layer4 server whose routes hold
// it (reload.go). So when a reload routes the listener to a handler of
// another identity, the flow ends even if its identity lives on at another
// listener, and the client's next datagram takes the listener's new route.
package stabilize
