//go:build linux

package main

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// loopEvents is the most ready sockets one epoll wait returns.
const loopEvents = 256

// slot is one outstanding datagram of a flow.
type slot struct {
	seq  uint64
	sent time.Time
	used bool
}

// loadFlow is one client socket of a loop.
type loadFlow struct {
	fd       int
	index    int // the flow's number in the load: its source address, its place in the ramp
	seq      uint64
	next     time.Time // fixed-rate mode: when the next datagram is due
	broken   bool      // its socket failed: what it had outstanding was counted lost
	answered bool      // it has had a reply
	busy     bool      // it has had a reply to a datagram of the window
}

// loop runs the closed loops of its share of the flows: it waits in Go's
// netpoller on an epoll descriptor that watches their sockets, reads each
// ready socket once (a reply), and answers it with the flow's next request.
// A periodic scan, not a timer per flow, finds the requests that timed out.
// Only the loop's goroutine touches its state.
type loop struct {
	lc     loadConfig
	st     *loadState
	epfd   int
	file   *os.File // epfd, in Go's netpoller (never its Fd: that makes it blocking)
	poll   syscall.RawConn
	waitf  func(fd uintptr) bool
	events []unix.EpollEvent
	ready  int
	flows  []loadFlow
	slots  []slot // flow i's window is slots[i*window : (i+1)*window]
	due    dueHeap
	req    []byte // the request; each send writes its sequence number in it
	buf    []byte
	// outstanding counts the used slots of every flow.
	outstanding int
	// t0, t1 are the measured window, and hardStop when the loop ends at
	// the latest, once fixed is set: until then the loop sets the flows up
	// (one datagram each, not refilled when answered) and no send is in the
	// window.
	t0, t1, hardStop time.Time
	fixed            bool
	res              flowResult
}

func newLoop(lc loadConfig) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		_ = unix.Close(epfd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	// A non-blocking descriptor makes os.NewFile use the netpoller.
	f := os.NewFile(uintptr(epfd), "bench-load")
	poll, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	l := &loop{
		lc:     lc,
		epfd:   epfd,
		file:   f,
		poll:   poll,
		events: make([]unix.EpollEvent, loopEvents),
		req:    make([]byte, lc.payload),
		buf:    make([]byte, lc.payload+128),
		res:    flowResult{latencies: make([]int64, 0, 1<<16)},
	}
	for i := range l.req {
		l.req[i] = 'a' + byte(i%26)
	}
	l.waitf = func(fd uintptr) bool {
		l.ready = udpio.EpollReady(fd, l.events)
		return l.ready > 0 // else wait until readable
	}
	return l, nil
}

// open adds flow i of the load: a socket bound to its source address and
// connected to dst.
func (l *loop) open(i int, dst *unix.SockaddrInet4) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("socket", err)
	}
	if err := l.setup(fd, i, dst); err != nil {
		_ = unix.Close(fd)
		return err
	}
	l.flows = append(l.flows, loadFlow{fd: fd, index: i})
	l.slots = append(l.slots, make([]slot, l.lc.window)...)
	return nil
}

func (l *loop) setup(fd, i int, dst *unix.SockaddrInet4) error {
	if err := unix.Bind(fd, l.lc.source(i)); err != nil {
		return os.NewSyscallError("bind", err)
	}
	// Large buffers, so that a burst of replies is not dropped here.
	if _, err := setSockBufFD(fd, sockBuf); err != nil {
		return err
	}
	if err := unix.Connect(fd, dst); err != nil {
		return os.NewSyscallError("connect", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(len(l.flows))}
	return os.NewSyscallError("epoll_ctl", unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev))
}

// close closes the flows' sockets and the epoll descriptor.
func (l *loop) close() {
	for _, f := range l.flows {
		_ = unix.Close(f.fd)
	}
	_ = l.file.Close()
}

// run drives the loop's flows: each starts at its place in the ramp after
// the set-up's and again after the load's start, and the loop ends once
// the window [t0, t1) is over and nothing is outstanding, at hardStop, or
// when ctx ends.
func (l *loop) run(ctx context.Context) {
	begin := l.st.begin
	if l.lc.establish > 0 {
		l.ramp(begin)
	}
	scanEvery := max(l.lc.timeout/4, 10*time.Millisecond)
	nextScan := begin.Add(scanEvery)
	var deadline time.Time
	for {
		now := time.Now()
		l.fixWindow()
		if ctx.Err() != nil || (l.fixed && now.After(l.hardStop)) {
			l.expireAll(now)
			return
		}
		if !now.Before(nextScan) {
			for i := range l.flows {
				l.expire(i, now, false)
			}
			nextScan = now.Add(scanEvery)
		}
		for len(l.due) > 0 && !l.due[0].at.After(now) {
			l.sendDue(l.due.pop())
		}
		if l.fixed && !now.Before(l.t1) && l.outstanding == 0 {
			return
		}
		next := nextScan
		switch poll := now.Add(windowPoll); {
		case l.fixed:
			if l.hardStop.Before(next) {
				next = l.hardStop
			}
		case deadline.After(now) && !deadline.After(poll):
			next = deadline // soon enough to learn the window in time
		case poll.Before(next):
			next = poll
		}
		if len(l.due) > 0 && l.due[0].at.Before(next) {
			next = l.due[0].at
		}
		if !next.Equal(deadline) {
			deadline = next
			_ = l.file.SetReadDeadline(deadline)
		}
		if err := l.poll.Read(l.waitf); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			l.expireAll(time.Now()) // the descriptor is closed: not while running
			return
		}
		for _, ev := range l.events[:l.ready] {
			l.receive(int(ev.Fd))
		}
	}
}

// fixWindow takes the load's start and window once they are fixed, and
// starts the flows' windows.
func (l *loop) fixWindow() {
	if l.fixed {
		return
	}
	if w := l.st.window.Load(); w != 0 {
		l.t0 = time.Unix(0, w)
		l.t1 = l.t0.Add(l.lc.duration)
		l.hardStop = l.t1.Add(l.lc.timeout + time.Second)
		l.fixed = true
		l.ramp(time.Unix(0, l.st.start.Load()))
	}
}

// ramp starts each flow at its place in the ramp after start: its set-up
// datagram, or its window once the load is fixed.
func (l *loop) ramp(start time.Time) {
	for i, f := range l.flows {
		at := start
		if l.lc.flows > 1 {
			at = start.Add(time.Duration(int64(l.lc.ramp) * int64(f.index) / int64(l.lc.flows)))
		}
		l.due.push(due{at: at, flow: int32(i), slot: -1})
	}
}

func (l *loop) inWindow(t time.Time) bool { return l.fixed && !t.Before(l.t0) && t.Before(l.t1) }

// window is the range of flow i's slots.
func (l *loop) window(i int) (from, to int) {
	return i * l.lc.window, (i + 1) * l.lc.window
}

// receive reads one datagram from flow i's socket, counts the reply and
// refills its slot: at once, or in fixed-rate mode when the next datagram
// is due.
func (l *loop) receive(i int) {
	f := &l.flows[i]
	if f.broken {
		return
	}
	n, errno := recv(f.fd, l.buf)
	now := time.Now()
	switch errno {
	case 0:
	case unix.EAGAIN, unix.ECONNREFUSED:
		// Nothing after all, or an ICMP port unreachable from an earlier
		// datagram.
		return
	default:
		// The socket is broken; what is outstanding is lost.
		l.expire(i, now, true)
		f.broken = true
		_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, f.fd, nil)
		return
	}
	if n < seqLen {
		l.res.corrupt++
		return
	}
	seq := binary.LittleEndian.Uint64(l.buf[n-seqLen : n])
	j := l.find(i, seq)
	if (j >= 0 || seq > 0 && seq <= f.seq) && !f.answered {
		f.answered = true
		l.st.firstReply(now)
	}
	if j < 0 {
		if seq > 0 && seq <= f.seq {
			l.res.late++
		} else {
			l.res.corrupt++
		}
		return
	}
	sent := l.slots[j].sent
	if rtt := now.Sub(sent); l.inWindow(sent) {
		if rtt > l.lc.timeout {
			l.res.lost++
			l.res.late++
		} else {
			l.res.received++
			l.res.latencies = append(l.res.latencies, int64(rtt))
			if !f.busy {
				f.busy = true
				l.res.busy++
			}
		}
	}
	l.release(j)
	if !l.fixed {
		return // set up: it waits for the load
	}
	if l.lc.interval > 0 {
		if at := l.pace(f, sent, now); at.After(now) {
			l.due.push(due{at: at, flow: int32(i), slot: int32(j)})
			return
		}
	}
	l.send(i, j)
}

// pace is when, in fixed-rate mode, flow f's next datagram is due: interval
// after the last was due, not after it was sent, so that sending late does
// not lower the rate; at most one interval of lateness is made up.
func (l *loop) pace(f *loadFlow, sent, now time.Time) time.Time {
	if f.next.IsZero() {
		f.next = sent
	}
	f.next = f.next.Add(l.lc.interval)
	if f.next.Before(now.Add(-l.lc.interval)) {
		f.next = now.Add(-l.lc.interval)
	}
	return f.next
}

// sendDue makes a send whose time has come: a flow's set-up datagram, its
// window's free slots, or its next paced datagram.
func (l *loop) sendDue(d due) {
	i := int(d.flow)
	if l.flows[i].broken {
		return
	}
	if d.slot >= 0 {
		l.send(i, int(d.slot))
		return
	}
	from, to := l.window(i)
	if !l.fixed {
		to = from + 1
	}
	for j := from; j < to; j++ {
		if !l.slots[j].used {
			l.send(i, j)
		}
	}
}

// send fills slot j of flow i with a new datagram, if the window is still
// open.
func (l *loop) send(i, j int) {
	now := time.Now()
	s := &l.slots[j]
	if l.fixed && !now.Before(l.t1) {
		s.used = false
		return
	}
	f := &l.flows[i]
	f.seq++
	binary.LittleEndian.PutUint64(l.req[len(l.req)-seqLen:], f.seq)
	*s = slot{seq: f.seq, sent: now, used: true}
	l.outstanding++
	counted := l.inWindow(now)
	if counted {
		l.res.sent++
	}
	if errno := send(f.fd, l.req); errno != 0 && counted {
		// The slot stays used: it times out and counts as lost.
		l.res.sendErrors++
	}
}

// release frees slot j.
func (l *loop) release(j int) {
	l.slots[j].used = false
	l.outstanding--
}

// find returns the slot of flow i waiting for seq, or -1.
func (l *loop) find(i int, seq uint64) int {
	from, to := l.window(i)
	for j := from; j < to; j++ {
		if l.slots[j].used && l.slots[j].seq == seq {
			return j
		}
	}
	return -1
}

// expire counts flow i's datagrams outstanding for longer than the timeout
// (or all of them, when all is set) as lost, and refills their slots while
// the window is open.
func (l *loop) expire(i int, now time.Time, all bool) {
	from, to := l.window(i)
	for j := from; j < to; j++ {
		s := l.slots[j]
		if !s.used || (!all && now.Sub(s.sent) <= l.lc.timeout) {
			continue
		}
		if l.inWindow(s.sent) {
			l.res.lost++
		}
		l.release(j)
		if !all {
			l.send(i, j)
		}
	}
}

// expireAll counts everything outstanding as lost.
func (l *loop) expireAll(now time.Time) {
	for i := range l.flows {
		l.expire(i, now, true)
	}
}

// recv and send are the non-blocking socket calls of the loop, made raw as
// the balancer's data path makes them (see udpio): they never wait, so
// there is no P to hand off.
func recv(fd int, b []byte) (int, syscall.Errno) {
	n, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), unix.MSG_DONTWAIT, 0, 0)
	return int(n), errno
}

func send(fd int, b []byte) syscall.Errno {
	_, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), unix.MSG_DONTWAIT, 0, 0)
	return errno
}

// due is a send waiting for its time: a flow's first window (slot < 0), at
// its place in the ramp, or in fixed-rate mode its next datagram.
type due struct {
	at   time.Time
	flow int32
	slot int32
}

// dueHeap is a min-heap of sends by time.
type dueHeap []due

func (h *dueHeap) push(d due) {
	*h = append(*h, d)
	q := *h
	for i := len(q) - 1; i > 0; {
		p := (i - 1) / 2
		if !q[i].at.Before(q[p].at) {
			break
		}
		q[i], q[p] = q[p], q[i]
		i = p
	}
}

func (h *dueHeap) pop() due {
	q := *h
	top := q[0]
	n := len(q) - 1
	q[0] = q[n]
	q = q[:n]
	for i := 0; ; {
		c := 2*i + 1
		if c >= n {
			break
		}
		if c+1 < n && q[c+1].at.Before(q[c].at) {
			c++
		}
		if !q[c].at.Before(q[i].at) {
			break
		}
		q[i], q[c] = q[c], q[i]
		i = c
	}
	*h = q
	return top
}
