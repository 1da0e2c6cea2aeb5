//go:build !unix

package transport

import "net"

// rawReader is empty where there is no LazyReader: the adapters read with
// Read.
type rawReader struct{}

func newRawReader(net.Conn) rawReader { return rawReader{} }
