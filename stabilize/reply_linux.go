package stabilize

import (
	"net/netip"
	"os"
	"runtime"
	"sync"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// replyReactor relays the replies of many flows. One goroutine waits on all
// their upstream-facing sockets with epoll, reads each ready socket with
// recvmmsg, and sends the replies to their clients with one sendmmsg per
// listener socket, on udp/ and fastudp/ alike. Flows need no goroutine or
// buffer of their own for replies. A reply the listener socket cannot take
// now is dropped and counted, never waited for.
type replyReactor struct {
	epfd  int
	poll  syscall.RawConn       // epfd in Go's netpoller
	waitf func(fd uintptr) bool // epoll_wait without blocking
	ready int                   // events of the last wait

	mu    sync.Mutex
	slots []reactorSlot // by epoll event data
	free  []int32

	events []unix.EpollEvent
	flows  []*Flow     // of the events, read from slots once per round
	warm   int         // what readyFlows loaded
	in     *udpio.Msgs // the replies read in this round
	used   int         // messages of in filled so far

	// Replies queued for sendmmsg, in in's buffers, and their flows.
	out         *udpio.SendQueue
	outFlows    []*Flow
	outHandlers []*Handler // the flows' handlers when their replies were read
	sendf       func(fd uintptr) bool
	sendFrom    int
	sendTo      int
	segment     int // of a UDP GSO send; 0: sendmmsg
	sent        int
	sendErr     syscall.Errno
}

// replyState is a flow's registration with its reactor.
type replyState struct {
	replyMu   sync.Mutex      // held while the reactor reads the flow
	replySrc  netip.Addr      // under replyMu: the replies' source address, if the listener's is unspecified
	fd        int             // of the upstream-facing socket, read under replyMu until stopped
	outFamily int             // of the listener's socket
	outRC     syscall.RawConn // of the listener's socket, if known
	reactor   *replyReactor
	slot      int32
	stopped   bool // under replyMu: the socket is closed
}

type reactorSlot struct {
	fl  *Flow
	gen int32
}

// reactorBatch is how many replies one round reads at most.
const reactorBatch = 64

// reactors are started on first use, and again after a failed start.
var reactors struct {
	sync.Mutex
	list []*replyReactor
	turn int
}

// reactorFor returns a reactor for a new flow: one per two CPUs the runtime
// uses. Fewer, busier reactors relay more replies per wake-up and per
// sendmmsg (measured on 2 CPUs: one reactor takes 8-10% less CPU per
// datagram than two). A reactor that fails to start (EMFILE, say) is tried
// again for the next flow.
func reactorFor() (*replyReactor, error) {
	reactors.Lock()
	defer reactors.Unlock()
	for len(reactors.list) < max(1, runtime.GOMAXPROCS(0)/2) {
		r, err := newReplyReactor()
		if err != nil {
			if len(reactors.list) == 0 {
				return nil, err
			}
			break
		}
		reactors.list = append(reactors.list, r)
		go r.run()
	}
	reactors.turn++
	return reactors.list[reactors.turn%len(reactors.list)], nil
}

func newReplyReactor() (*replyReactor, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		_ = unix.Close(epfd)
		return nil, err
	}
	// A non-blocking descriptor makes os.NewFile use the netpoller. The
	// reactors live as long as the process.
	f := os.NewFile(uintptr(epfd), "stabilize-replies")
	poll, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	r := &replyReactor{
		epfd:     epfd,
		poll:     poll,
		events:   make([]unix.EpollEvent, reactorBatch),
		flows:    make([]*Flow, 0, reactorBatch),
		in:       udpio.NewMsgs(reactorBatch, ListenerBufferSize),
		out:      udpio.NewSendQueue(reactorBatch),
		outFlows: make([]*Flow, reactorBatch),

		outHandlers: make([]*Handler, reactorBatch),
	}
	r.waitf = func(fd uintptr) bool {
		r.ready = udpio.EpollReady(fd, r.events)
		return r.ready > 0 // else wait until readable
	}
	r.sendf = func(fd uintptr) bool {
		if r.segment > 0 {
			r.sent, r.sendErr = r.sendTo-r.sendFrom, r.out.SendGSO(fd, r.sendFrom, r.sendTo, r.segment)
		} else {
			r.sent, r.sendErr = r.out.Send(fd, r.sendFrom, r.sendTo)
		}
		return true
	}
	return r, nil
}

// setReplySrc makes src the source address of fl's replies, or the
// address the route picks if src is invalid. fl.replyMu is held, or the
// flow is new.
func (fl *Flow) setReplySrc(src netip.Addr) { fl.replySrc = src }

// startReplies registers fl's socket with a reactor, which sends the
// replies out of li's listener socket.
func (fl *Flow) startReplies(li *listenerInfo) error {
	r, err := reactorFor()
	if err != nil {
		return err
	}
	fl.outRC, fl.outFamily = li.outRC, li.outFamily
	fd := fl.conn.FD()
	fl.reactor, fl.fd = r, fd
	r.mu.Lock()
	if n := len(r.free); n > 0 {
		fl.slot, r.free = r.free[n-1], r.free[:n-1]
	} else {
		fl.slot = int32(len(r.slots))
		r.slots = append(r.slots, reactorSlot{})
	}
	r.slots[fl.slot].fl = fl
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: fl.slot, Pad: r.slots[fl.slot].gen}
	r.mu.Unlock()
	return unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fd, &ev)
}

// stopReplies frees fl's reactor slot, so that the reactor skips the
// flow's events from now on, waits until the reactor is done reading the
// flow, and closes the socket. Closing takes the socket off the reactor's
// epoll set: the kernel drops a file's epoll entries once its last
// descriptor is closed, and a flow's socket has no other (udpio.Replace
// closes its new socket's own at once). Until udpio.Socket.Close closes
// it, after the calls in progress (or while a child process between fork
// and exec holds it), the entry's events carry the freed slot's old
// generation, which the reactor skips; it reads only flows not stopped, so
// never a reused descriptor. Replies already read may still leave in the
// reactor's current batch.
func (fl *Flow) stopReplies() {
	if r := fl.reactor; r != nil {
		r.mu.Lock()
		r.slots[fl.slot] = reactorSlot{gen: r.slots[fl.slot].gen + 1}
		r.free = append(r.free, fl.slot)
		r.mu.Unlock()
	}
	fl.replyMu.Lock()
	fl.stopped = true
	_ = fl.conn.Close()
	fl.replyMu.Unlock()
}

// run relays replies forever. It waits in Go's netpoller on the epoll
// descriptor itself, which is readable while any flow socket is, so the
// reactor is scheduled like any goroutine blocked on a socket.
func (r *replyReactor) run() {
	for {
		if err := r.poll.Read(r.waitf); err != nil {
			return
		}
		flows := r.readyFlows()
		r.used = 0
		for _, fl := range flows {
			fl.replyMu.Lock()
			if !fl.stopped {
				r.read(fl)
			}
			fl.replyMu.Unlock()
			if r.used == r.in.Len() {
				r.flush()
				r.used = 0
			}
		}
		clear(flows)
		r.flush()
	}
}

// readyFlows returns the flows of the last wait's events, skipping those
// that have ended. It reads each one's reply state once, all before the
// first is relayed, so that with many flows, whose memory has gone cold in
// the CPU's cache, the misses overlap instead of following one another.
func (r *replyReactor) readyFlows() []*Flow {
	flows := r.flows[:0]
	warm := 0
	r.mu.Lock()
	for _, ev := range r.events[:r.ready] {
		s := r.slots[ev.Fd]
		if s.fl == nil || s.gen != ev.Pad {
			continue // a flow that has ended
		}
		fl := s.fl
		flows = append(flows, fl)
		// A load in each cache line of h and of the fields from health
		// to out, wherever the object starts in a line.
		fl.lastActive.Load()
		fl.health.since.Load()
		warm += fl.fd + fl.outFamily + int(fl.client.Port())
		if fl.out != nil {
			warm++
		}
	}
	r.mu.Unlock()
	r.warm = warm
	return flows
}

// read reads fl's waiting replies into the free part of the round's buffers
// and queues them. fl.replyMu is held.
func (r *replyReactor) read(fl *Flow) {
	for r.used < r.in.Len() {
		want := r.in.Len() - r.used
		n, errno := r.in.Recv(uintptr(fl.fd), r.used)
		if errno == unix.EAGAIN {
			return
		}
		if errno != 0 {
			fl.h.socketError(fl, errno)
			continue
		}
		for i := r.used; i < r.used+n; i++ {
			from, data, truncated := r.in.Message(i)
			if fl.reply(from, data, truncated) == nil {
				continue
			}
			if fl.out == nil {
				fl.writeThroughCaddy(data)
				continue
			}
			r.outFlows[r.out.Len()], r.outHandlers[r.out.Len()] = fl, fl.h
			r.out.AddFrom(data, fl.client, fl.replySrc, fl.outFamily)
		}
		r.used += n
		if n < want {
			return // drained
		}
	}
}

// flush sends the queued replies, one sendmmsg per run of the same listener
// socket. A reply the socket cannot take now is dropped and counted.
func (r *replyReactor) flush() {
	queued := r.out.Len()
	for start := 0; start < queued; {
		first := r.outFlows[start]
		end := start + 1
		for end < queued && r.outFlows[end].out == first.out {
			end++
		}
		r.sendFrom = start
		for r.sendFrom < end {
			// Replies to one client of one size leave as one UDP GSO
			// datagram.
			r.sendTo, r.segment = r.out.NextRun(r.sendFrom, end, !gsoOff.Load())
			err := first.outRC.Write(r.sendf)
			if err == nil && r.sendErr != 0 && r.unsource() {
				err = first.outRC.Write(r.sendf)
			}
			if r.segment > 0 && err == nil && r.sendErr != 0 && r.sendErr != unix.EAGAIN {
				gsoFailed(r.sendErr)
				r.segment = 0
				err = first.outRC.Write(r.sendf)
			}
			switch {
			case err != nil:
				r.dropQueued(end, dropWriteError)
			case r.sendErr == unix.EAGAIN:
				r.dropQueued(end, dropSendBufferFull)
			case r.sendErr != 0:
				r.dropQueued(r.sendFrom+1, dropWriteError)
			default:
				r.sendFrom += r.sent
			}
		}
		start = end
	}
	clear(r.outFlows[:queued])
	clear(r.outHandlers[:queued])
	r.out.Reset()
}

// unsource reports whether the last send failed because its source
// address is no longer the host's (removed, or a virtual address moved
// away), after dropping the sources of what failed: a sendmmsg's first
// datagram, a GSO send's run. Sent again, they leave from the route's
// address, as before sources were named. Logged once per handler.
func (r *replyReactor) unsource() bool {
	if !udpio.SourceGone(r.sendErr) {
		return false
	}
	to := r.sendFrom + 1
	if r.segment > 0 {
		to = r.sendTo
	}
	src := r.out.Unsource(r.sendFrom, to)
	if !src.IsValid() {
		return false
	}
	if h := r.outHandlers[r.sendFrom]; !h.warnedSrc.Swap(true) {
		h.logger.Warn("the address clients sent to is no longer local: replies leave from the route's address",
			zap.Stringer("source", src), zap.Error(r.sendErr))
	}
	return true
}

// dropQueued drops the queued replies from sendFrom up to to.
func (r *replyReactor) dropQueued(to int, reason dropReason) {
	for _, h := range r.outHandlers[r.sendFrom:to] {
		h.drop(reason)
	}
	r.sendFrom = to
}
