package quicwire

import "errors"

// PacketType is the type of a long header packet.
type PacketType uint8

// Long header packet types. Their codepoints differ between versions.
const (
	PacketTypeInitial PacketType = iota
	PacketType0RTT
	PacketTypeHandshake
	PacketTypeRetry
	PacketTypeVersionNegotiation
)

// Errors of Header.Type.
var (
	// ErrShortHeader is returned for a short header, which has no type
	// field.
	ErrShortHeader = errors.New("quicwire: short header has no packet type")
	// ErrUnknownVersion is returned for a version whose long header types
	// are not known here.
	ErrUnknownVersion = errors.New("quicwire: unknown QUIC version")
	// ErrConnIDTooLong is returned for a QUIC v1 or v2 header with a
	// connection ID over 20 octets, which RFC 9000 section 17.2 says to
	// drop.
	ErrConnIDTooLong = errors.New("quicwire: connection ID longer than 20 octets")
)

// typesV1 and typesV2 map the two type bits (0x30) of the first octet to
// the packet type: RFC 9000 section 17.2 and RFC 9369 section 3.2.
var (
	typesV1 = [4]PacketType{PacketTypeInitial, PacketType0RTT, PacketTypeHandshake, PacketTypeRetry}
	typesV2 = [4]PacketType{PacketTypeRetry, PacketTypeInitial, PacketType0RTT, PacketTypeHandshake}
)

// Type returns the type of a long header packet of QUIC version 1 or 2, or
// PacketTypeVersionNegotiation for version 0.
func (h *Header) Type() (PacketType, error) {
	if !h.IsLong() {
		return 0, ErrShortHeader
	}
	if h.Version == VersionNegotiation {
		return PacketTypeVersionNegotiation, nil
	}
	var types *[4]PacketType
	switch h.Version {
	case Version1:
		types = &typesV1
	case Version2:
		types = &typesV2
	default:
		return 0, ErrUnknownVersion
	}
	if len(h.DCID) > MaxConnIDLenV1 || len(h.SCID) > MaxConnIDLenV1 {
		return 0, ErrConnIDTooLong
	}
	return types[h.First>>4&0x3], nil
}

// String returns the packet type's name.
func (t PacketType) String() string {
	switch t {
	case PacketTypeInitial:
		return "Initial"
	case PacketType0RTT:
		return "0-RTT"
	case PacketTypeHandshake:
		return "Handshake"
	case PacketTypeRetry:
		return "Retry"
	case PacketTypeVersionNegotiation:
		return "Version Negotiation"
	}
	return "unknown"
}
