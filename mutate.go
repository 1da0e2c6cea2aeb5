package sockfsm

// mutation is a deliberate bug that the property tests must catch. The
// engine's mutation branches are compiled in only with the build tag
// sockfsm_mutate (see mutate_on.go); without it mutating is false and the
// compiler removes them.
type mutation uint16

const (
	mutSkipFlush      mutation = 1 << iota // drop queued output instead of flushing it before the half-close
	mutWriteAfterFIN                       // write once more after our half-close
	mutSkipLinger                          // close at once after our FIN, with the peer's input unread
	mutNoIdleTimeout                       // never time out an idle connection
	mutNoWriteTimeout                      // never time out a flush
	mutNoLingerTime                        // linger without a total bound
	mutCloseTwice                          // close the transport twice (the engine asks twice and the driver's guard is off)
	mutNotifyTwice                         // call OnClose twice
	mutIgnorePeerFIN                       // keep reading after the peer's FIN (CLOSE_WAIT)
)
