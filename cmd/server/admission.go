package main

import (
	"flag"

	"github.com/sockfsm/sockfsm/proxy"
)

// admissionFlags registers the flags that decide whether a connection is
// served at all: -proxy-protocol and -max-conns-per-ip.
func admissionFlags(fs *flag.FlagSet, o *options) {
	fs.Func("proxy-protocol", "read a PROXY protocol v1/v2 header (HAProxy send-proxy, send-proxy-v2) before each connection; `mode`: off, required (refuse connections without one) or optional (use it if present) (default off)",
		func(s string) error {
			m, err := proxy.ParseMode(s)
			o.proxy = m
			return err
		})
	fs.IntVar(&o.cfg.MaxConnsPerIP, "max-conns-per-ip", 0, "refuse new connections from a client address with this many open, the PROXY header's address if -proxy-protocol is on (0: unlimited)")
}

// applyAdmission sets the Config fields the admission flags imply.
func applyAdmission(o *options) {
	o.cfg.Prelude = proxy.Prelude(o.proxy)
}
