package quicwire

import (
	"encoding/binary"
	"errors"
)

// Versions with a known long header layout.
const (
	// VersionNegotiation is the version field of a Version Negotiation
	// packet.
	VersionNegotiation uint32 = 0
	// Version1 is QUIC version 1, RFC 9000.
	Version1 uint32 = 0x00000001
	// Version2 is QUIC version 2, RFC 9369.
	Version2 uint32 = 0x6b3343cf
)

// Connection ID limits.
const (
	// MaxConnIDLen is the longest connection ID the invariants allow.
	MaxConnIDLen = 255
	// MaxConnIDLenV1 is the longest connection ID in QUIC versions 1 and 2.
	MaxConnIDLenV1 = 20
)

// headerFormLong is the first octet's header form bit.
const headerFormLong = 0x80

// Parse errors.
var (
	// ErrTruncated is returned for a packet that ends inside its invariant
	// header fields.
	ErrTruncated = errors.New("quicwire: packet truncated in its header")
	// ErrHeaderForm is returned by ParseLong for a short header and by
	// ParseShort for a long header.
	ErrHeaderForm = errors.New("quicwire: wrong header form")
	// ErrDCIDLen is returned by ParseShort for an expected DCID length
	// outside 0 to MaxConnIDLen.
	ErrDCIDLen = errors.New("quicwire: DCID length out of range")
)

// Header is the version-independent part of a QUIC packet header. Its
// slices alias the parsed packet.
type Header struct {
	// First is the first octet. Its most significant bit is the header
	// form; the other seven bits are version-specific.
	First byte
	// Version is a long header's version; zero in a short header, and in a
	// Version Negotiation packet.
	Version uint32
	// DCID is the destination connection ID.
	DCID []byte
	// SCID is a long header's source connection ID; nil in a short header.
	SCID []byte
	// Rest is the version-specific remainder of the packet after DCID (short
	// header) or SCID (long header). In a Version Negotiation packet, it is
	// the list of supported versions.
	Rest []byte
}

// IsLongHeader reports whether b starts with a long header.
func IsLongHeader(b []byte) bool {
	return len(b) > 0 && b[0]&headerFormLong != 0
}

// Parse parses the header of the packet b. It allocates nothing, even for
// an error. A short header does not encode
// its DCID length: shortDCIDLen is the length the receiver expects there.
func Parse(b []byte, shortDCIDLen int) (Header, error) {
	if IsLongHeader(b) {
		return ParseLong(b)
	}
	return ParseShort(b, shortDCIDLen)
}

// ParseLong parses the long header that b starts with: first octet, version,
// then the DCID and SCID, each preceded by its length.
func ParseLong(b []byte) (Header, error) {
	if len(b) < 7 { // first octet, version, two empty connection IDs
		return Header{}, ErrTruncated
	}
	if !IsLongHeader(b) {
		return Header{}, ErrHeaderForm
	}
	h := Header{First: b[0], Version: binary.BigEndian.Uint32(b[1:5])}
	var ok bool
	if h.DCID, b, ok = connID(b[5:]); !ok {
		return Header{}, ErrTruncated
	}
	if h.SCID, h.Rest, ok = connID(b); !ok {
		return Header{}, ErrTruncated
	}
	return h, nil
}

// connID splits b into the connection ID its first octet gives the length
// of, and the rest.
func connID(b []byte) (id, rest []byte, ok bool) {
	if len(b) == 0 || len(b) < 1+int(b[0]) {
		return nil, nil, false
	}
	n := 1 + int(b[0])
	return b[1:n:n], b[n:], true
}

// ParseShort parses the short header that b starts with: the first octet
// and a DCID of dcidLen octets.
func ParseShort(b []byte, dcidLen int) (Header, error) {
	if dcidLen < 0 || dcidLen > MaxConnIDLen {
		return Header{}, ErrDCIDLen
	}
	if len(b) < 1+dcidLen {
		return Header{}, ErrTruncated
	}
	if IsLongHeader(b) {
		return Header{}, ErrHeaderForm
	}
	n := 1 + dcidLen
	return Header{First: b[0], DCID: b[1:n:n], Rest: b[n:]}, nil
}

// IsLong reports whether h is a long header.
func (h *Header) IsLong() bool { return h.First&headerFormLong != 0 }
