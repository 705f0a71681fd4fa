// Package quicwire parses the version-independent properties of QUIC
// packets, RFC 8999, and the long header packet types of QUIC versions 1
// (RFC 9000) and 2 (RFC 9369).
//
// A long header carries its version and both connection IDs, each up to
// 255 octets by the invariants. A short header carries only the destination
// connection ID, whose length the receiver must already know. Nothing past
// those fields is parsed: the rest of the packet is version-specific.
//
// Parsing allocates nothing: connection IDs are sub-slices of the packet.
package quicwire
