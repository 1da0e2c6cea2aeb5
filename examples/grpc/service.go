package main

// The Counter service, without protoc: its messages are Go structs, its
// codec is encoding/json registered with gRPC under the content-subtype
// "json" (requests travel as application/grpc+json), and its
// grpc.ServiceDesc is written by hand, as protoc-gen-go-grpc would write it.

import (
	"context"
	"encoding/json"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

// codecName is the content-subtype of the Counter's messages.
const codecName = "json"

// jsonCodec is a gRPC codec that marshals messages with encoding/json.
type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (jsonCodec) Name() string                       { return codecName }

func init() { encoding.RegisterCodec(jsonCodec{}) }

// EchoRequest is Echo's request.
type EchoRequest struct {
	Text string `json:"text"`
}

// EchoReply is Echo's reply.
type EchoReply struct {
	Text string `json:"text"`
}

// CountRequest asks Count for N messages, numbered 1 to N.
type CountRequest struct {
	// N is the number of messages, at most MaxCount.
	N int `json:"n"`
	// Every, if positive, is the pause before each message after the
	// first.
	Every time.Duration `json:"every,omitempty"`
	// Size is the length of each message's padding, at most MaxSize bytes.
	Size int `json:"size,omitempty"`
	// Follow keeps the stream open after the N messages, as tail -f does,
	// until the client cancels it or the server stops: a stream that
	// GracefulStop alone would wait for forever.
	Follow bool `json:"follow,omitempty"`
}

// CountReply is one of Count's messages.
type CountReply struct {
	Seq int    `json:"seq"`
	Pad string `json:"pad,omitempty"`
}

// Limits on a CountRequest.
const (
	MaxCount = 1 << 20
	MaxSize  = 1 << 20 // well within gRPC's default 4 MiB per message
)

// Full method names.
const (
	serviceName = "sockfsm.examples.Counter"
	echoMethod  = "/" + serviceName + "/Echo"
	countMethod = "/" + serviceName + "/Count"
)

// CounterServer is the service's interface, the ServiceDesc's HandlerType.
type CounterServer interface {
	// Echo is unary: it returns the request's text.
	Echo(context.Context, *EchoRequest) (*EchoReply, error)
	// Count is server-streaming: it sends the messages req asks for.
	Count(req *CountRequest, stream grpc.ServerStream) error
}

// CounterServiceDesc is the Counter service's description for
// grpc.Server.RegisterService.
var CounterServiceDesc = grpc.ServiceDesc{
	ServiceName: serviceName,
	HandlerType: (*CounterServer)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Echo", Handler: echoHandler},
	},
	Streams: []grpc.StreamDesc{
		{StreamName: "Count", Handler: countHandler, ServerStreams: true},
	},
	Metadata: "sockfsm/examples/grpc/service.go",
}

func echoHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	req := new(EchoRequest)
	if err := dec(req); err != nil {
		return nil, err
	}
	if interceptor == nil {
		return srv.(CounterServer).Echo(ctx, req)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: echoMethod}
	return interceptor(ctx, req, info, func(ctx context.Context, req any) (any, error) {
		return srv.(CounterServer).Echo(ctx, req.(*EchoRequest))
	})
}

func countHandler(srv any, stream grpc.ServerStream) error {
	req := new(CountRequest)
	if err := stream.RecvMsg(req); err != nil {
		return err
	}
	return srv.(CounterServer).Count(req, stream)
}

// Counter implements CounterServer.
type Counter struct {
	sent atomic.Int64
}

// Sent returns the number of Count messages sent so far, on all streams.
func (s *Counter) Sent() int64 { return s.sent.Load() }

// Echo implements CounterServer.
func (s *Counter) Echo(_ context.Context, req *EchoRequest) (*EchoReply, error) {
	return &EchoReply{Text: req.Text}, nil
}

// Count implements CounterServer.
func (s *Counter) Count(req *CountRequest, stream grpc.ServerStream) error {
	if req.N < 0 || req.N > MaxCount || req.Size < 0 || req.Size > MaxSize {
		return status.Errorf(codes.InvalidArgument, "n must be in [0, %d] and size in [0, %d]", MaxCount, MaxSize)
	}
	ctx := stream.Context()
	pad := strings.Repeat("x", req.Size)
	var tick *time.Ticker
	if req.Every > 0 {
		tick = time.NewTicker(req.Every)
		defer tick.Stop()
	}
	for seq := 1; seq <= req.N; seq++ {
		if seq > 1 && tick != nil {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return status.FromContextError(ctx.Err()).Err()
			}
		}
		if err := stream.SendMsg(&CountReply{Seq: seq, Pad: pad}); err != nil {
			return err
		}
		s.sent.Add(1)
	}
	if req.Follow {
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	}
	return nil
}

// CounterClient calls the Counter service.
type CounterClient struct {
	cc grpc.ClientConnInterface
}

// NewCounterClient returns a client of the Counter service on cc.
func NewCounterClient(cc grpc.ClientConnInterface) *CounterClient {
	return &CounterClient{cc: cc}
}

// Echo calls Echo.
func (c *CounterClient) Echo(ctx context.Context, text string, opts ...grpc.CallOption) (string, error) {
	var reply EchoReply
	opts = append([]grpc.CallOption{grpc.CallContentSubtype(codecName)}, opts...)
	if err := c.cc.Invoke(ctx, echoMethod, &EchoRequest{Text: text}, &reply, opts...); err != nil {
		return "", err
	}
	return reply.Text, nil
}

// Count calls Count; the stream ends when Recv returns io.EOF. Cancel ctx
// to end it early.
func (c *CounterClient) Count(ctx context.Context, req *CountRequest, opts ...grpc.CallOption) (*CountStream, error) {
	opts = append([]grpc.CallOption{grpc.CallContentSubtype(codecName)}, opts...)
	s, err := c.cc.NewStream(ctx, &CounterServiceDesc.Streams[0], countMethod, opts...)
	if err != nil {
		return nil, err
	}
	if err := s.SendMsg(req); err != nil && err != io.EOF {
		return nil, err
	}
	if err := s.CloseSend(); err != nil {
		return nil, err
	}
	return &CountStream{s: s}, nil
}

// CountStream is the client's side of a Count stream.
type CountStream struct {
	s grpc.ClientStream
}

// Recv returns the next message, or io.EOF after the last one.
func (s *CountStream) Recv() (*CountReply, error) {
	m := new(CountReply)
	if err := s.s.RecvMsg(m); err != nil {
		return nil, err
	}
	return m, nil
}
