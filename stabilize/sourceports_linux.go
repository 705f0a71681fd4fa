package stabilize

import "golang.org/x/sys/unix"

// rearm watches the flow's socket again after udpio.Replace put a new one
// behind its descriptor: closing the old one took it off the reactor.
func (fl *Flow) rearm() error {
	r := fl.reactor
	if r == nil {
		return nil
	}
	r.mu.Lock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: fl.slot, Pad: r.slots[fl.slot].gen}
	r.mu.Unlock()
	if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fl.fd, &ev); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}
