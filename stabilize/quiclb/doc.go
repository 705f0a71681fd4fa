// Package quiclb implements QUIC-LB, the IETF draft "Generating Routable
// QUIC Connection IDs" (draft-ietf-quic-load-balancers, editor's copy after
// -21): servers encode a server ID in the connection IDs they issue, and a
// load balancer that shares the configuration decodes it from the
// destination connection ID of any packet, including the first packet after
// a client migrates to a new address.
//
// A connection ID is a first octet (three config rotation bits, five bits
// of length), then the server ID and a nonce:
//
//   - without a key, in plaintext;
//   - with a key, when server ID and nonce make 16 octets, encrypted as one
//     AES-128-ECB block (aes.go);
//   - with a key otherwise, encrypted by a four-pass Feistel network whose
//     round function is AES-128-ECB (feistel.go).
//
// A Codec encodes and decodes one Config; a Decoder holds up to seven
// configurations at once, as during a key rotation. Decoding allocates
// nothing. A four-pass decode costs three AES blocks when NonceLen is at
// least ServerIDLen, and four otherwise. A Generator is the server side: a quic-go ConnectionIDGenerator
// that issues routable connection IDs for one server ID. For a quic-go
// server:
//
//	cfg := quiclb.Config{ID: 1, ServerIDLen: 2, NonceLen: 8, Key: key}
//	gen, err := quiclb.NewGenerator(cfg, []byte{0x00, 0x07}) // this server's ID
//	if err != nil { ... }
//	tr := &quic.Transport{Conn: udpConn, ConnectionIDGenerator: gen}
//	ln, err := tr.Listen(tlsConf, quicConf)
//
// The load balancer decodes with the same configuration:
//
//	dec, err := quiclb.NewDecoder(cfg)
//	serverID, err := dec.Decode(dcid) // quiclb.ErrUnroutable: use a fallback
//
// Without a key, anyone can read the server ID, and the draft asks servers
// not to issue more than one connection ID per connection (quic-go issues
// several, in NEW_CONNECTION_ID frames); use a key where clients migrate.
package quiclb
