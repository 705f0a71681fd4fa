// Package udpclient sends numbered datagrams to a udpecho server, or to a load
// balancer in front of several, and counts the replies per server.
//
// Each flow is its own UDP socket, so its own source port. A flow sends one
// request, waits up to Config.Timeout for its reply, then sends the next: a
// request is missing when its reply does not come in time.
//
// # Request format
//
//	request = <flow> "/" <seq> "/" filler
//
// flow and seq are decimal, counted from 0; the filler pads the request to
// Config.Size with letters that depend on seq. The reply must be the udpecho
// reply to exactly this request (see udpecho.Split).
package udpclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
)

// Config says what to send where.
type Config struct {
	// Target is the host:port to send to.
	Target string
	// Flows is the number of sockets (source ports) that send concurrently.
	// Default 1.
	Flows int
	// Count is the number of requests each flow sends; 0 means no limit.
	Count int
	// Duration stops each flow from sending new requests once it has passed;
	// 0 means no limit. At least one of Count and Duration must be set.
	Duration time.Duration
	// Size is the request size in bytes. A request is never shorter than its
	// "<flow>/<seq>/" header.
	Size int
	// Timeout is how long a flow waits for each reply. Default 1s.
	Timeout time.Duration
	// Interval is the least time between two requests of a flow.
	Interval time.Duration
	// OnReply, if set, is called for each matching reply. Flows call it
	// concurrently.
	OnReply func(Reply)
}

// Reply describes a reply that matched its request.
type Reply struct {
	Flow, Seq int
	Server    string // the udpecho identity that answered
	RTT       time.Duration
}

// Stats counts the requests and replies of one flow or of all flows.
type Stats struct {
	// Sent is the number of requests sent.
	Sent int
	// Received is the number of requests answered in time by a matching reply.
	Received int
	// Stale is the number of replies that matched an earlier request of the
	// flow, already answered or timed out: late replies and duplicates.
	Stale int
	// Corrupt is the number of replies that matched no request of the flow:
	// damaged, with no udpecho identity, or the echo of another flow's request.
	Corrupt int
	// PerServer is the number of matching replies per server identity.
	PerServer map[string]int
}

// Missing returns the number of requests that got no matching reply in time.
func (s Stats) Missing() int { return s.Sent - s.Received }

func (s *Stats) add(o Stats) {
	s.Sent += o.Sent
	s.Received += o.Received
	s.Stale += o.Stale
	s.Corrupt += o.Corrupt
	for server, n := range o.PerServer {
		s.PerServer[server] += n
	}
}

// FlowStats is the Stats of one flow.
type FlowStats struct {
	Local string // the flow's source address
	Stats
}

// Result is what Run reports.
type Result struct {
	Stats               // totals over all flows
	Flows   []FlowStats // per flow, indexed by flow number
	Elapsed time.Duration
}

// Run sends requests as cfg says and waits for their replies. It returns early,
// without error, when ctx is done; a request then in flight counts as missing.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if cfg.Count <= 0 && cfg.Duration <= 0 {
		return Result{}, errors.New("udpclient: set Count or Duration")
	}
	if cfg.Flows <= 0 {
		cfg.Flows = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Second
	}
	raddr, err := net.ResolveUDPAddr("udp", cfg.Target)
	if err != nil {
		return Result{}, fmt.Errorf("udpclient: resolve target %q: %w", cfg.Target, err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	res := Result{Stats: Stats{PerServer: map[string]int{}}, Flows: make([]FlowStats, cfg.Flows)}
	errs := make([]error, cfg.Flows)
	var wg sync.WaitGroup
	for i := range cfg.Flows {
		conn, err := net.DialUDP("udp", nil, raddr)
		if err != nil {
			errs[i] = fmt.Errorf("udpclient: flow %d: %w", i, err)
			cancel()
			break
		}
		res.Flows[i] = FlowStats{Local: conn.LocalAddr().String()}
		wg.Go(func() {
			defer conn.Close()
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			defer stop()
			f := &flow{id: i, cfg: &cfg, conn: conn, stats: &res.Flows[i].Stats}
			if err := f.run(ctx, start); err != nil && ctx.Err() == nil {
				errs[i] = fmt.Errorf("udpclient: flow %d (%s): %w", i, res.Flows[i].Local, err)
				cancel() // one broken flow ends the run
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	for _, f := range res.Flows {
		res.add(f.Stats)
	}
	return res, errors.Join(errs...)
}

// flow is one socket's send-and-wait loop.
type flow struct {
	id    int
	cfg   *Config
	conn  *net.UDPConn
	stats *Stats
	req   []byte // the request in flight
	prev  []byte // scratch space to rebuild an earlier request
}

// run sends requests until Count or Duration is reached. It returns an error
// when ctx is done.
func (f *flow) run(ctx context.Context, start time.Time) error {
	f.stats.PerServer = map[string]int{}
	buf := make([]byte, udpecho.MaxDatagram+1)
	for seq := 0; f.cfg.Count <= 0 || seq < f.cfg.Count; seq++ {
		sent := time.Now()
		if f.cfg.Duration > 0 && sent.Sub(start) >= f.cfg.Duration {
			return nil
		}
		f.req = request(f.req[:0], f.id, seq, f.cfg.Size)
		if err := f.send(); err != nil {
			return err
		}
		f.stats.Sent++
		if err := f.await(seq, sent, buf); err != nil {
			return err
		}
		if err := sleep(ctx, time.Until(sent.Add(f.cfg.Interval))); err != nil {
			return err
		}
	}
	return nil
}

// send writes the request. An ICMP port unreachable from an earlier request
// can fail one write, so a refused write is tried once more.
func (f *flow) send() error {
	_, err := f.conn.Write(f.req)
	if isRefused(err) {
		_, err = f.conn.Write(f.req)
	}
	if err != nil {
		return fmt.Errorf("send: %w", err)
	}
	return nil
}

// await reads replies until the one to request seq arrives or the timeout
// passes, counting stale and corrupt replies on the way.
func (f *flow) await(seq int, sent time.Time, buf []byte) error {
	if err := f.conn.SetReadDeadline(sent.Add(f.cfg.Timeout)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	for {
		n, err := f.conn.Read(buf)
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			return nil // missing
		case isRefused(err):
			continue // nothing listens at the target: wait out the timeout
		case err != nil:
			return fmt.Errorf("receive: %w", err)
		}
		server, echo, ok := udpecho.Split(buf[:n])
		switch {
		case ok && bytes.Equal(echo, f.req):
			f.stats.Received++
			f.stats.PerServer[string(server)]++
			if f.cfg.OnReply != nil {
				f.cfg.OnReply(Reply{Flow: f.id, Seq: seq, Server: string(server), RTT: time.Since(sent)})
			}
			return nil
		case ok && f.isEarlier(echo, seq):
			f.stats.Stale++
		default:
			f.stats.Corrupt++
		}
	}
}

// isEarlier reports whether echo is, byte for byte, a request this flow sent
// before request seq.
func (f *flow) isEarlier(echo []byte, seq int) bool {
	flowID, rest, _ := bytes.Cut(echo, []byte{'/'})
	seqText, _, _ := bytes.Cut(rest, []byte{'/'})
	if string(flowID) != strconv.Itoa(f.id) {
		return false
	}
	earlier, err := strconv.Atoi(string(seqText))
	if err != nil || earlier < 0 || earlier >= seq {
		return false
	}
	f.prev = request(f.prev[:0], f.id, earlier, f.cfg.Size)
	return bytes.Equal(echo, f.prev)
}

// request appends request seq of flow to b, padded to size bytes.
func request(b []byte, flow, seq, size int) []byte {
	b = strconv.AppendInt(b, int64(flow), 10)
	b = append(b, '/')
	b = strconv.AppendInt(b, int64(seq), 10)
	b = append(b, '/')
	for i := len(b); i < size; i++ {
		b = append(b, byte('a'+(seq+i)%26))
	}
	return b
}

// sleep waits for d or until ctx is done, whichever comes first, and returns
// ctx.Err() in the latter case.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
