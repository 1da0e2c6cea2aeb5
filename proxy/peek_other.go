//go:build !unix

package proxy

import (
	"errors"
	"net"
)

// peekSignature needs MSG_PEEK; on this platform Optional refuses every
// connection.
func peekSignature(net.Conn) (bool, error) {
	return false, errors.New("proxy: optional mode is not supported on this platform")
}
