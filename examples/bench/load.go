//go:build linux

package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"
)

// loadConfig is one closed-loop load: flows sockets (so flows source
// ports), each keeping window datagrams of payload bytes outstanding.
//
// The load runs for warmup+duration; only datagrams sent during the
// measured window [t0, t0+duration) count. A datagram whose reply has not
// come after timeout is lost: its window slot is refilled with a new
// datagram, so the loop never stalls. After the window, flows stop sending
// and wait at most timeout for the replies still outstanding.
type loadConfig struct {
	flows, window, payload    int
	warmup, duration, timeout time.Duration
	// ramp spreads the flows' first datagrams over this long.
	ramp time.Duration
	// interval, if set, paces each flow (fixed-rate mode): a datagram is
	// sent at most every interval, so the load offers flows/interval
	// datagrams per second while the balancer keeps up.
	interval time.Duration
}

// flowsPerSource is how many flows share one client source address: fewer
// than Linux's ephemeral ports per address (28,232 by default), so that
// 100,000 flows do not run the load generator itself out of ports. Flow i
// sends from 127.0.0.(1 + i/flowsPerSource).
const flowsPerSource = 20_000

// sourceOf is the client address of flow i.
func sourceOf(i int) *net.UDPAddr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, byte((1+i/flowsPerSource)>>8), byte(1+i/flowsPerSource))}
}

// loadResult counts the datagrams sent during the measured window.
type loadResult struct {
	Sent       int64 // requests sent in the window
	Received   int64 // of those, answered within the timeout
	Lost       int64 // of those, not answered within the timeout
	Late       int64 // replies that came after their request was counted lost
	Corrupt    int64 // replies that matched no request of the flow
	SendErrors int64 // failed writes (e.g. ICMP port unreachable); counted lost
	Window     time.Duration
	latencies  []int64 // ns, one per received reply
}

// loadHooks are called at the edges of the measured window, from the
// goroutine that runs the load, so that the balancer's CPU time and memory
// can be read at those instants.
type loadHooks struct {
	start func()
	end   func()
}

// seqLen is the size of the sequence number that ends every request. The
// reply ends with the request (udpecho prepends its identity; the caddy-l4
// echo handler sends it back as is), so the reply's last 8 bytes name the
// request it answers.
const seqLen = 8

// runLoad drives the load against addr (host:port on 127.0.0.1) and returns
// what it measured. Every loop in it is bounded by the window's end plus the
// timeout, or by ctx.
func runLoad(ctx context.Context, addr string, lc loadConfig, hooks loadHooks) (*loadResult, error) {
	raddr, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, err
	}
	if !raddr.IP.IsLoopback() {
		return nil, errors.New("load: refusing a target outside 127.0.0.0/8")
	}
	// Open every socket first, so that a file-descriptor shortage shows up
	// before anything is sent.
	conns := make([]*net.UDPConn, lc.flows)
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	for i := range conns {
		if conns[i], err = net.DialUDP("udp4", sourceOf(i), raddr); err != nil {
			return nil, fmt.Errorf("opening the socket of flow %d (of %d): %w", i+1, lc.flows, err)
		}
		// Large buffers, so that a burst of replies is not dropped here.
		rc, err := conns[i].SyscallConn()
		if err != nil {
			return nil, err
		}
		if _, err := setSockBuf(rc, sockBuf); err != nil {
			return nil, err
		}
	}

	begin := time.Now()
	t0 := begin.Add(lc.warmup)
	t1 := t0.Add(lc.duration)
	hardStop := t1.Add(lc.timeout + time.Second)
	results := make([]flowResult, lc.flows)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		startAt := begin
		if lc.flows > 1 {
			startAt = begin.Add(time.Duration(int64(lc.ramp) * int64(i) / int64(lc.flows)))
		}
		go func() {
			defer wg.Done()
			f := &flow{conn: c, lc: lc, t0: t0, t1: t1, hardStop: hardStop, res: &results[i]}
			f.run(ctx, startAt)
		}()
	}
	sleepUntil(ctx, t0)
	if hooks.start != nil {
		hooks.start()
	}
	sleepUntil(ctx, t1)
	if hooks.end != nil {
		hooks.end()
	}
	wg.Wait()

	res := &loadResult{Window: lc.duration}
	n := 0
	for i := range results {
		n += len(results[i].latencies)
	}
	res.latencies = make([]int64, 0, n)
	for i := range results {
		r := &results[i]
		res.Sent += r.sent
		res.Received += r.received
		res.Lost += r.lost
		res.Late += r.late
		res.Corrupt += r.corrupt
		res.SendErrors += r.sendErrors
		res.latencies = append(res.latencies, r.latencies...)
	}
	slices.Sort(res.latencies)
	return res, ctx.Err()
}

func sleepUntil(ctx context.Context, t time.Time) {
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(t)):
	}
}

// flowResult is one flow's share of a loadResult.
type flowResult struct {
	sent, received, lost, late, corrupt, sendErrors int64
	latencies                                       []int64
}

// slot is one outstanding datagram of a flow.
type slot struct {
	seq  uint64
	sent time.Time
	used bool
}

// flow is one client socket running its closed loop.
type flow struct {
	conn         *net.UDPConn
	lc           loadConfig
	t0, t1       time.Time
	hardStop     time.Time
	res          *flowResult
	slots        []slot
	seq          uint64
	req          []byte
	outstanding  int
	scanInterval time.Duration
	next         time.Time // fixed-rate mode: when the next datagram is due
}

func (f *flow) inWindow(t time.Time) bool { return !t.Before(f.t0) && t.Before(f.t1) }

// send fills slot i with a new datagram, if the window is still open.
func (f *flow) send(i int) {
	now := time.Now()
	if !now.Before(f.t1) {
		f.slots[i].used = false
		return
	}
	f.seq++
	binary.LittleEndian.PutUint64(f.req[len(f.req)-seqLen:], f.seq)
	f.slots[i] = slot{seq: f.seq, sent: now, used: true}
	f.outstanding++
	counted := f.inWindow(now)
	if counted {
		f.res.sent++
	}
	if _, err := f.conn.Write(f.req); err != nil && counted {
		// The slot stays used: it times out and counts as lost.
		f.res.sendErrors++
	}
}

// release frees slot i.
func (f *flow) release(i int) {
	f.slots[i].used = false
	f.outstanding--
}

func (f *flow) run(ctx context.Context, startAt time.Time) {
	sleepUntil(ctx, startAt)
	f.slots = make([]slot, f.lc.window)
	f.req = make([]byte, f.lc.payload)
	for i := range f.req {
		f.req[i] = 'a' + byte(i%26)
	}
	if n := int(f.lc.duration / time.Millisecond); n > 0 {
		// A rough guess that saves most regrowth.
		f.res.latencies = make([]int64, 0, min(n*f.lc.window, 1<<16))
	}
	f.scanInterval = max(f.lc.timeout/4, 10*time.Millisecond)
	buf := make([]byte, f.lc.payload+128)

	for i := range f.slots {
		f.send(i)
	}
	deadline := time.Now().Add(f.scanInterval)
	_ = f.conn.SetReadDeadline(deadline)
	for f.outstanding > 0 {
		n, err := f.conn.Read(buf)
		now := time.Now()
		if err != nil {
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
			case errors.Is(err, syscall.ECONNREFUSED):
				// An ICMP port unreachable from an earlier datagram.
				continue
			default:
				// The socket is broken; what is outstanding is lost.
				f.expire(now, true)
				return
			}
			if ctx.Err() != nil || now.After(f.hardStop) {
				f.expire(now, true)
				return
			}
			f.expire(now, false)
			deadline = now.Add(f.scanInterval)
			_ = f.conn.SetReadDeadline(deadline)
			continue
		}
		if n < seqLen {
			f.res.corrupt++
			continue
		}
		seq := binary.LittleEndian.Uint64(buf[n-seqLen : n])
		i := f.find(seq)
		if i < 0 {
			if seq > 0 && seq <= f.seq {
				f.res.late++
			} else {
				f.res.corrupt++
			}
			continue
		}
		s := f.slots[i]
		rtt := now.Sub(s.sent)
		if f.inWindow(s.sent) {
			if rtt > f.lc.timeout {
				f.res.lost++
				f.res.late++
			} else {
				f.res.received++
				f.res.latencies = append(f.res.latencies, int64(rtt))
			}
		}
		f.release(i)
		f.pace(s.sent)
		f.send(i)
	}
}

// pace waits, in fixed-rate mode, until the next datagram is due: interval
// after the last was due, not after it was sent, so that sleeping late does
// not lower the rate; at most one interval of lateness is made up.
func (f *flow) pace(sent time.Time) {
	if f.lc.interval <= 0 {
		return
	}
	if f.next.IsZero() {
		f.next = sent
	}
	f.next = f.next.Add(f.lc.interval)
	if now := time.Now(); f.next.Before(now.Add(-f.lc.interval)) {
		f.next = now.Add(-f.lc.interval)
	}
	time.Sleep(time.Until(f.next))
}

// find returns the slot waiting for seq, or -1.
func (f *flow) find(seq uint64) int {
	for i := range f.slots {
		if f.slots[i].used && f.slots[i].seq == seq {
			return i
		}
	}
	return -1
}

// expire counts the datagrams outstanding for longer than the timeout (or
// all of them, when all is set) as lost, and refills their slots while the
// window is open.
func (f *flow) expire(now time.Time, all bool) {
	for i := range f.slots {
		s := f.slots[i]
		if !s.used || (!all && now.Sub(s.sent) <= f.lc.timeout) {
			continue
		}
		if f.inWindow(s.sent) {
			f.res.lost++
		}
		f.release(i)
		if !all {
			f.send(i)
		}
	}
}
