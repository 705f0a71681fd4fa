package stabilize

import (
	"reflect"
	"sync/atomic"
)

// fieldCache finds a named field of a struct, as reflect.Value's
// FieldByName does, but searches each struct type once: FieldByName's
// search, with its maps, costs microseconds and a large stack frame, which
// made each new flow's goroutine grow and copy its stack (listenerOf and
// closeNotices read caddy-l4's per-flow packetConn for every flow).
type fieldCache struct {
	name string
	last atomic.Pointer[fieldIndex] // of the latest type: caddy-l4 has one
}

// The fields of caddy-l4's packetConn that listener.go reads.
var packetConnField, closeChField = fieldCache{name: "PacketConn"}, fieldCache{name: "closeCh"}

// The fields of caddy-l4's Server that reload.go reads.
var serverAddrsField, serverRouteField = fieldCache{name: "listenAddrs"}, fieldCache{name: "compiledRoute"}

type fieldIndex struct {
	t     reflect.Type
	index []int // nil: no such field
}

// of returns v's field, or the zero Value if v's type has none.
func (c *fieldCache) of(v reflect.Value) reflect.Value {
	t := v.Type()
	fi := c.last.Load()
	if fi == nil || fi.t != t {
		sf, ok := t.FieldByName(c.name)
		fi = &fieldIndex{t: t}
		if ok {
			fi.index = sf.Index
		}
		c.last.Store(fi)
	}
	if fi.index == nil {
		return reflect.Value{}
	}
	return v.FieldByIndex(fi.index)
}
