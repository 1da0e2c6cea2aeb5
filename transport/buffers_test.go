package transport

import "testing"

func TestBuffers(t *testing.T) {
	b := NewBuffers(32)
	p, q := b.Get(), b.Get()
	if len(*p) != 32 || len(*q) != 32 {
		t.Fatalf("Get returned %d and %d bytes, want 32", len(*p), len(*q))
	}
	if b.Borrowed() != 2 {
		t.Fatalf("Borrowed = %d, want 2", b.Borrowed())
	}
	*p = (*p)[:3] // a borrower may reslice; Put restores the length
	b.Put(p)
	b.Put(q)
	b.Put(nil)
	if b.Borrowed() != 0 {
		t.Fatalf("Borrowed = %d after Put, want 0", b.Borrowed())
	}
	for range 10 {
		r := b.Get()
		if len(*r) != 32 {
			t.Fatalf("Get after Put returned %d bytes, want 32", len(*r))
		}
		b.Put(r)
	}
	// A buffer of another size is not pooled: Get's length holds.
	other := make([]byte, 8)
	b.Get()
	b.Put(&other)
	if r := b.Get(); len(*r) != 32 {
		t.Fatalf("Get returned %d bytes after a foreign Put, want 32", len(*r))
	}

	defer func() {
		if recover() == nil {
			t.Error("NewBuffers(0) did not panic")
		}
	}()
	NewBuffers(0)
}
