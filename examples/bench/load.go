//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// loadConfig is one closed-loop load: flows sockets (so flows source
// ports), each keeping window datagrams of payload bytes outstanding.
//
// With establish set, a set-up comes first: each flow sends one datagram
// (at its place in the ramp) and waits for its reply, sending again after
// each timeout, until every flow has had a reply or establish has passed
// since the start. Then the load runs for warmup+duration; only datagrams
// sent during the measured window [t0, t0+duration) count. A datagram whose
// reply has not come after timeout is lost: its window slot is refilled
// with a new datagram, so the loop never stalls. After the window, flows
// stop sending and wait at most timeout for the replies still outstanding.
type loadConfig struct {
	flows, window, payload    int
	warmup, duration, timeout time.Duration
	// ramp spreads the flows' first datagrams over this long.
	ramp time.Duration
	// interval, if set, paces each flow (fixed-rate mode): a datagram is
	// sent at most every interval, so the load offers flows/interval
	// datagrams per second while the balancer keeps up.
	interval time.Duration
	// establish, if set, is the longest the set-up may take; after it,
	// the load starts with the flows answered so far.
	establish time.Duration
	// clients, if set, is the namespace the flows' sockets are made in
	// (-clients netns); nil: this process's, on 127.0.0.1….
	clients *clientNet
}

// flowsPerSource is how many flows share one client source address: fewer
// than Linux's ephemeral ports per address (28,232 by default), so that
// 100,000 flows do not run the load generator itself out of ports. Flow i
// sends from 127.0.0.(1 + i/flowsPerSource).
const flowsPerSource = 20_000

// source is the client address of flow i: 127.0.0.(1 + i/flowsPerSource),
// or its equivalent in lc.clients's namespace.
func (lc *loadConfig) source(i int) *unix.SockaddrInet4 {
	if lc.clients != nil {
		return &unix.SockaddrInet4{Addr: [4]byte(lc.clients.source(i))}
	}
	return &unix.SockaddrInet4{Addr: [4]byte{127, 0, byte((1 + i/flowsPerSource) >> 8), byte(1 + i/flowsPerSource)}}
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
	// Warmup is how long after the first datagram the window started.
	Warmup time.Duration
	// Established is how many flows had had a reply when the window
	// started; GaveUp says that the set-up stopped waiting for the others
	// (loadConfig.establish).
	Established int
	GaveUp      bool
	// Setup is the time from the first flow's first datagram to the last
	// flow's first reply; 0 if some flow never had one.
	Setup time.Duration
	// Busy is how many flows had a reply to a datagram of the window.
	Busy      int
	latencies []int64 // ns, one per received reply
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

// loopsPerCPU is how many event loops drive the flows per CPU the
// benchmark's Go runtime uses: more than one, so that a loop whose thread
// another process preempts stalls only a share of the flows; few, so that
// each wake-up of a loop serves many flows' replies. 2 and 4 loops on 2 CPUs
// measured alike, within the machine's noise.
const loopsPerCPU = 2

// loopsFor is how many event loops drive flows flows.
func loopsFor(flows int) int { return max(1, min(flows, loopsPerCPU*runtime.GOMAXPROCS(0))) }

// runLoad drives the load against addr (host:port on 127.0.0.1) and returns
// what it measured. Every loop in it is bounded by the window's end plus the
// timeout, or by ctx.
//
// Each flow is its own connected socket, as a client would have; a few
// event loops (loopsFor) serve them all, each waiting in epoll for the
// sockets whose replies have come, so that the load generator's cost per
// datagram does not grow with the flows the way a goroutine, a timer and a
// netpoller registration per flow did.
func runLoad(ctx context.Context, addr string, lc loadConfig, hooks loadHooks) (*loadResult, error) {
	raddr, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, err
	}
	if lc.clients != nil {
		if !raddr.IP.Equal(lc.clients.hostIP()) {
			return nil, fmt.Errorf("load: refusing a target other than the client namespace's peer %s", lc.clients.hostIP())
		}
	} else if !raddr.IP.IsLoopback() {
		return nil, errors.New("load: refusing a target outside 127.0.0.0/8")
	}
	dst := &unix.SockaddrInet4{Port: raddr.Port}
	copy(dst.Addr[:], raddr.IP.To4())

	loops := make([]*loop, loopsFor(lc.flows))
	defer func() {
		for _, l := range loops {
			if l != nil {
				l.close()
			}
		}
	}()
	for i := range loops {
		if loops[i], err = newLoop(lc); err != nil {
			return nil, err
		}
	}
	// Open every socket first, so that a file-descriptor shortage shows up
	// before anything is sent.
	openAll := func() error {
		for i := range lc.flows {
			if err := loops[i%len(loops)].open(i, dst); err != nil {
				return fmt.Errorf("opening the socket of flow %d (of %d): %w", i+1, lc.flows, err)
			}
		}
		return nil
	}
	if lc.clients != nil {
		err = lc.clients.inNamespace(openAll)
	} else {
		err = openAll()
	}
	if err != nil {
		return nil, err
	}

	st := &loadState{begin: time.Now(), flows: int64(lc.flows)}
	if lc.establish == 0 {
		st.fix(st.begin, lc.warmup)
	}
	for _, l := range loops {
		l.st = st
	}
	var wg sync.WaitGroup
	for _, l := range loops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.run(ctx)
		}()
	}
	res := &loadResult{Window: lc.duration}
	if lc.establish > 0 {
		res.GaveUp = !st.setUp(ctx, lc)
	}
	t0 := time.Unix(0, st.window.Load())
	res.Warmup = t0.Sub(st.begin)
	sleepUntil(ctx, t0)
	res.Established = int(st.answered.Load())
	if hooks.start != nil {
		hooks.start()
	}
	sleepUntil(ctx, t0.Add(lc.duration))
	if hooks.end != nil {
		hooks.end()
	}
	wg.Wait()
	if last := st.lastFirstReply.Load(); st.answered.Load() == st.flows && last > 0 {
		res.Setup = time.Duration(last - st.begin.UnixNano())
	}
	n := 0
	for _, l := range loops {
		n += len(l.res.latencies)
	}
	res.latencies = make([]int64, 0, n)
	for _, l := range loops {
		r := &l.res
		res.Sent += r.sent
		res.Received += r.received
		res.Lost += r.lost
		res.Late += r.late
		res.Corrupt += r.corrupt
		res.SendErrors += r.sendErrors
		res.Busy += r.busy
		res.latencies = append(res.latencies, r.latencies...)
	}
	slices.Sort(res.latencies)
	return res, ctx.Err()
}

// loadState is what a load's loops share with the goroutine that runs it:
// the flows answered so far, and when the load and its window start.
type loadState struct {
	begin time.Time
	flows int64
	// answered counts the flows that have had a reply; lastFirstReply is
	// the latest of their first replies, in Unix ns.
	answered, lastFirstReply atomic.Int64
	// start is when the load starts (after the set-up), and window the
	// measured window's start, in Unix ns; 0 until fixed.
	start, window atomic.Int64
}

// windowLead is how far ahead the load's start is fixed after a set-up, so
// that every loop (each waking at least every windowPoll until then) knows
// it in time.
const (
	windowLead = 50 * time.Millisecond
	windowPoll = 10 * time.Millisecond
)

// fix sets the start of the load and, warmup after it, of the window.
func (st *loadState) fix(start time.Time, warmup time.Duration) {
	st.start.Store(start.UnixNano())
	st.window.Store(start.Add(warmup).UnixNano())
}

// firstReply records flow's first reply at now.
func (st *loadState) firstReply(now time.Time) {
	st.answered.Add(1)
	for ns := now.UnixNano(); ; {
		last := st.lastFirstReply.Load()
		if last >= ns || st.lastFirstReply.CompareAndSwap(last, ns) {
			return
		}
	}
}

// setUp waits until every flow has had a reply, or lc.establish has passed
// since the beginning, then fixes the load's start; it reports whether
// every flow had a reply.
func (st *loadState) setUp(ctx context.Context, lc loadConfig) bool {
	limit := st.begin.Add(lc.establish)
	for st.answered.Load() < st.flows && time.Now().Before(limit) && ctx.Err() == nil {
		time.Sleep(windowPoll)
	}
	st.fix(time.Now().Add(windowLead), lc.warmup)
	return st.answered.Load() == st.flows
}

func sleepUntil(ctx context.Context, t time.Time) {
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(t)):
	}
}

// flowResult is one loop's share of a loadResult.
type flowResult struct {
	sent, received, lost, late, corrupt, sendErrors int64
	busy                                            int
	latencies                                       []int64
}
